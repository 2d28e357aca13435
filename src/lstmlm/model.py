"""The LSTM language model: embedding -> dropout -> stacked LSTM -> dropout -> linear decoder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config

# (h, c) for each layer, each of shape (1, batch, hidden)
Hidden = list[tuple[torch.Tensor, torch.Tensor]]


class LSTMLM(nn.Module):
    """Word-level LSTM language model.

    The layers are separate single-layer `nn.LSTM`s (each one fused kernel over time) so that
    each layer can have its own size and its own regularization.
    """

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_size)
        sizes = [cfg.embedding_size] + [cfg.hidden_size] * cfg.num_layers
        self.layers = nn.ModuleList(
            nn.LSTM(sizes[i], sizes[i + 1]) for i in range(cfg.num_layers))
        self.decoder = nn.Linear(cfg.hidden_size, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As in the reference implementations: small uniform embedding/decoder, zero decoder bias.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def init_hidden(self, batch_size: int) -> Hidden:
        weight = self.decoder.weight
        return [(weight.new_zeros(1, batch_size, layer.hidden_size),
                 weight.new_zeros(1, batch_size, layer.hidden_size)) for layer in self.layers]

    def features(self, tokens: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """Last layer's (dropped-out) output for tokens of shape (time, batch)."""
        cfg = self.cfg
        x = F.dropout(self.embedding(tokens), cfg.dropout_input, self.training)
        new_hidden = []
        for i, layer in enumerate(self.layers):
            x, state = layer(x, hidden[i])
            new_hidden.append(state)
            if i < len(self.layers) - 1:
                x = F.dropout(x, cfg.dropout_hidden, self.training)
        x = F.dropout(x, cfg.dropout_output, self.training)
        return x, new_hidden

    def forward(self, tokens: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """Logits of shape (time, batch, vocab) and the new hidden state."""
        x, hidden = self.features(tokens, hidden)
        return self.decoder(x), hidden

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor,
             hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """Mean cross-entropy of the next-token targets (flattened, time-major)."""
        logits, hidden = self(tokens, hidden)
        return F.cross_entropy(logits.view(-1, self.vocab_size), targets), hidden


def detach(hidden: Hidden) -> Hidden:
    """Cut the graph between BPTT windows while keeping the state's values."""
    return [(h.detach(), c.detach()) for h, c in hidden]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
