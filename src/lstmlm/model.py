"""The LSTM language model: embedding -> dropout -> stacked LSTM -> dropout -> linear decoder
(or adaptive softmax), with AWD-LSTM's regularizers as switches (all off in the plain baseline)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from . import fused
from .config import Config, ConfigError
from .regularizers import (activation_penalty, drop_connect, dropout, embedding_dropout_mask,
                           locked_dropout)
from .softmax import AdaptiveSoftmax

# (h, c) for each layer, each of shape (1, batch, layer size)
Hidden = list[tuple[torch.Tensor, torch.Tensor]]

# oneDNN, which runs torch's CPU LSTM under bf16 autocast, has no bf16 LSTM on some CPUs
# (AVX2-only ones: it fails to build the kernel); there the LSTM runs in fp32, the rest in bf16.
CPU_BF16_LSTM = torch.ops.mkldnn._is_mkldnn_bf16_supported()


class LSTMLM(nn.Module):
    """Word-level LSTM language model.

    The layers are separate single-layer `nn.LSTM`s (each one fused kernel over time) so that
    each layer can have its own size, and weight drop can hand each layer a dropped copy of its
    `weight_hh_l0` for one forward pass (`torch.func.functional_call`): the kernel stays fused
    and the gradient flows back to the registered weight.
    """

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_size)
        sizes = [cfg.embedding_size] + [cfg.hidden_size] * (cfg.num_layers - 1) + [cfg.output_size]
        self.layers = nn.ModuleList(
            nn.LSTM(sizes[i], sizes[i + 1]) for i in range(cfg.num_layers))
        if cfg.softmax == "adaptive":  # ties inside (softmax.py says what)
            self.decoder = AdaptiveSoftmax(cfg.output_size, vocab_size, cfg.cutoffs,
                                           cfg.adaptive_div_value,
                                           self.embedding.weight if cfg.tie_weights else None)
        else:
            self.decoder = nn.Linear(cfg.output_size, vocab_size)
        # Source of the per-stream dropout masks; None: torch's global RNG. Set by the trainer
        # under data-parallel training, where each rank must draw its own (distributed.py).
        self.stream_generator: torch.Generator | None = None
        self.reset_parameters()
        if cfg.tie_weights and cfg.softmax == "full":
            self.decoder.weight = self.embedding.weight

    def reset_parameters(self) -> None:
        # As in the reference implementations: small uniform embedding/decoder, zero decoder bias.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if isinstance(self.decoder, AdaptiveSoftmax):
            self.decoder.reset_parameters()
            return
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def init_hidden(self, batch_size: int) -> Hidden:
        weight = self.embedding.weight
        return [(weight.new_zeros(1, batch_size, layer.hidden_size),
                 weight.new_zeros(1, batch_size, layer.hidden_size)) for layer in self.layers]

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if self.cfg.variational_dropout:
            return locked_dropout(x, p, self.training, self.stream_generator)
        return dropout(x, p, self.training, self.stream_generator)

    def run_layer(self, i: int, x: torch.Tensor, state):
        layer = self.layers[i]
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not CPU_BF16_LSTM:
            with torch.autocast("cpu", enabled=False):  # this CPU's LSTM kernels are fp32 only
                return self.run_layer(i, x.float(), state)
        if self.training and self.cfg.weight_drop > 0:
            dropped = drop_connect(layer.weight_hh_l0, self.cfg.weight_drop, True)
            return functional_call(layer, {"weight_hh_l0": dropped}, (x, state))
        return layer(x, state)

    def embed(self, tokens: torch.Tensor, tied: bool = False):
        """(the tokens' embeddings, with embedding dropout in training; the embedding's weight
        for the decoder tied to it, or None).

        The weight comes only with `tied`, when the weights are tied and autograd records: then
        from the same autograd node as the embeddings (`fused.tied_lookup`), which adds the
        lookup's gradient into the decoder's in place; otherwise the decoder reads the
        embedding itself."""
        weight = self.embedding.weight
        scale = embedding_dropout_mask(weight, self.cfg.dropout_embedding, self.training)
        if tied and self.cfg.tie_weights and torch.is_grad_enabled() and weight.requires_grad:
            return fused.tied_lookup(weight, tokens, scale)
        embedded = F.embedding(tokens, weight)
        return (embedded if scale is None else embedded * F.embedding(tokens, scale)), None

    def features(self, tokens: torch.Tensor, hidden: Hidden):
        """Last layer's output for tokens (time, batch): (after dropout, before dropout, state)."""
        return self.recur(self.embed(tokens)[0], hidden)

    def recur(self, embedded: torch.Tensor, hidden: Hidden):
        """`features` from the embedded tokens."""
        cfg = self.cfg
        x = self.dropout(embedded, cfg.dropout_input)
        new_hidden = []
        for i in range(len(self.layers)):
            x, state = self.run_layer(i, x, hidden[i])
            new_hidden.append(state)
            if i < len(self.layers) - 1:
                x = self.dropout(x, cfg.dropout_hidden)
        return self.dropout(x, cfg.dropout_output), x, new_hidden

    def forward(self, tokens: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """Logits of shape (time, batch, vocab) and the new hidden state. With the adaptive
        softmax the logits are the exact log-probabilities, which softmax leaves as they are."""
        x, _, hidden = self.features(tokens, hidden)
        return self.decoder(x), hidden

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, hidden: Hidden):
        """(mean next-token cross-entropy, AR/TAR penalty, new hidden state).

        Targets are flattened time-major. The penalty is zero unless training with AR/TAR on.
        """
        embedded, tied_weight = self.embed(tokens, tied=True)
        dropped, raw, hidden = self.recur(embedded, hidden)
        loss = self.output_loss(dropped, targets, tied_weight)
        penalty = loss.new_zeros(())
        if self.training and (self.cfg.ar_alpha or self.cfg.tar_beta):
            penalty = activation_penalty(dropped, raw, self.cfg.ar_alpha, self.cfg.tar_beta)
        return loss, penalty, hidden

    def output_loss(self, x: torch.Tensor, targets: torch.Tensor,
                    tied_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of the decoder's prediction from features x (..., output size)
        against flat targets; `tied_weight`: the embedding's weight from `embed`, if any."""
        x = x.reshape(-1, x.size(-1))
        if isinstance(self.decoder, AdaptiveSoftmax):  # the head and the targets' clusters only
            return self.decoder.loss(x, targets, tied_weight)
        weight = self.decoder.weight if tied_weight is None else tied_weight
        if torch.is_autocast_enabled(x.device.type):  # autocast's low-precision decoder
            return F.cross_entropy(F.linear(x, weight, self.decoder.bias), targets)
        # the same loss, never holding the (tokens x vocabulary) logits (fused.py)
        return fused.linear_cross_entropy(x, weight, self.decoder.bias, targets)

    @torch.no_grad()
    def target_log_probs(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) for features x (..., output size) and targets of x's leading shape,
        without gradients: per-token scores, from the same decoder paths as `output_loss`."""
        flat, flat_targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        if isinstance(self.decoder, AdaptiveSoftmax):
            log_probs = self.decoder.target_log_probs(flat, flat_targets)
        elif torch.is_autocast_enabled(x.device.type):
            logits = self.decoder(flat).float()
            log_probs = torch.log_softmax(logits, -1).gather(1, flat_targets.unsqueeze(1))
        else:
            log_probs = fused.target_log_probs(flat, self.decoder.weight, self.decoder.bias,
                                               flat_targets)
        return log_probs.view(targets.shape)


def pick_device(name: str) -> torch.device:
    """cpu, cuda, or auto (cuda when there is one); a clear error for cuda without a GPU."""
    if name not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"device must be cpu, cuda or auto, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def detach(hidden: Hidden) -> Hidden:
    """Cut the graph between BPTT windows while keeping the state's values."""
    return [(h.detach(), c.detach()) for h, c in hidden]


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters: a matrix the decoder shares with the embedding counts once (the
    adaptive softmax holds the embedding's Parameter itself and reads its rows as it runs)."""
    return sum(p.numel() for p in model.parameters())
