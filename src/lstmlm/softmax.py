"""Adaptive softmax (Grave, Joulin, Cissé, Grangier, Jégou 2017, "Efficient softmax approximation
for GPUs"): the decoder for large vocabularies.

Word ids are sorted by training frequency, so cutoffs split the vocabulary into a head of
frequent words and tail clusters of rarer ones:

    ids 0 .. c1-1        head: one softmax over these words plus one entry per tail cluster
    ids c1 .. c2-1, ...  tail i: its own softmax, on the features projected to size d // div^i

    log p(w) = log p_head(w)                              for a head word
    log p(w) = log p_head(cluster i) + log p_tail_i(w)    for a word of tail i

Training only needs the head and, for each target, its own cluster, so most tokens (the frequent
words) never touch the large rare-word matrices. Called as a module, it returns the exact
log-probabilities over the whole vocabulary, so everything that reads the full decoder's logits
(softmax, log_softmax, cross_entropy) reads these unchanged.

Tying (`tie_weights`): a word matrix is the embedding's rows for its words whenever its input
size equals the embedding size. The head's always is (tying needs the last LSTM layer's size to
equal the embedding size); a tail's is when its projection keeps that size, i.e. with
div_value = 1. The cluster rows, the biases, the projections and any other tail matrix are the
softmax's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, in fp32 when the logits are bf16/fp16: CPU autocast
    leaves log_softmax in low precision, and the loss is to stay fp32."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return torch.log_softmax(logits, -1)


class AdaptiveSoftmax(nn.Module):
    def __init__(self, in_size: int, vocab_size: int, cutoffs: list[int], div_value: float,
                 embedding: nn.Parameter | None = None):
        super().__init__()
        # Cutoffs at or past the vocabulary size would make empty clusters: one setting then
        # serves corpora of every size (with none left, the head is a full softmax).
        cutoffs = [c for c in cutoffs if c < vocab_size]
        self.bounds = [0, *cutoffs, vocab_size]  # cluster k holds ids bounds[k] .. bounds[k+1]-1
        self.sizes = [in_size] + [max(1, int(in_size // div_value ** (k + 1)))
                                  for k in range(len(cutoffs))]
        self.tied = [embedding is not None and size == embedding.size(1) for size in self.sizes]
        if embedding is not None:
            self.embedding_weight = embedding  # the same Parameter: saved and counted once
        self.words = nn.ParameterDict({
            str(k): nn.Parameter(torch.empty(self.bounds[k + 1] - self.bounds[k], size))
            for k, size in enumerate(self.sizes) if not self.tied[k]})
        self.bias = nn.Parameter(torch.empty(vocab_size))  # every word's, as in the full decoder
        self.clusters = nn.Parameter(torch.empty(len(cutoffs), in_size))  # head row per tail
        self.cluster_bias = nn.Parameter(torch.empty(len(cutoffs)))
        self.projections = nn.ParameterList(
            nn.Parameter(torch.empty(size, in_size)) for size in self.sizes[1:])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Word and cluster rows as the full decoder's, projections as nn.Linear's default scale.
        for weight in [*self.words.values(), self.clusters]:
            nn.init.uniform_(weight, -0.1, 0.1)
        for weight in self.projections:
            bound = 1 / math.sqrt(weight.size(1))
            nn.init.uniform_(weight, -bound, bound)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.cluster_bias)

    @property
    def cluster_sizes(self) -> list[int]:
        """Words in the head, then in each tail cluster."""
        return [hi - lo for lo, hi in zip(self.bounds, self.bounds[1:])]

    def word_weights(self, embedding_rows: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Output matrix of each cluster (0: the head's words): embedding rows when tied.

        The tied ones come from one `split` of the embedding (or are `embedding_rows`, such a
        split from `fused.tied_lookup`), whose backward writes their gradients into one
        embedding-sized tensor; a slice per cluster would cost a zero-filled embedding-sized
        gradient each (about 5 % of `wt2-cpu-hour`'s step)."""
        if embedding_rows is None and any(self.tied):
            embedding_rows = self.embedding_weight.split(self.cluster_sizes)
        return [embedding_rows[k] if tied else self.words[str(k)]
                for k, tied in enumerate(self.tied)]

    def head(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the head words (`matrix`'s), then of each tail cluster:
        (..., c1 + tails)."""
        words = F.linear(x, matrix, self.bias[: self.bounds[1]])
        clusters = F.linear(x, self.clusters, self.cluster_bias)
        return _log_softmax(torch.cat([words, clusters], -1))

    def tail(self, k: int, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Log-probabilities within tail cluster k (>= 1) of its words (`matrix`'s): (..., its
        size)."""
        lo, hi = self.bounds[k], self.bounds[k + 1]
        logits = F.linear(F.linear(x, self.projections[k - 1]), matrix, self.bias[lo:hi])
        return _log_softmax(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-probabilities over the vocabulary (..., vocab) of features (..., in_size)."""
        words = self.word_weights()
        head = self.head(x, words[0])
        shortlist = self.bounds[1]
        parts = [head[..., :shortlist]]
        for k in range(1, len(self.bounds) - 1):
            parts.append(head[..., shortlist + k - 1, None] + self.tail(k, x, words[k]))
        return torch.cat(parts, -1)

    def loss(self, x: torch.Tensor, targets: torch.Tensor,
             embedding_rows: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Mean negative log-likelihood of `targets` (N,) given features (N, in_size)."""
        return -self.target_log_probs(x, targets, embedding_rows).mean()

    def target_log_probs(self, x: torch.Tensor, targets: torch.Tensor,
                         embedding_rows: list[torch.Tensor] | None = None) -> torch.Tensor:
        """log p(target) for each of `targets` (N,) given features (N, in_size), computing
        each tail only for the rows whose target is in it. Every tail runs, on zero rows if
        need be, so every parameter is in the graph (DistributedDataParallel expects that)."""
        words = self.word_weights(embedding_rows)
        head = self.head(x, words[0])
        shortlist = self.bounds[1]
        index = targets  # the head entry to read: the word itself, or its cluster
        in_tails = head.new_zeros(targets.shape)
        for k in range(1, len(self.bounds) - 1):
            lo, hi = self.bounds[k], self.bounds[k + 1]
            member = (targets >= lo) & (targets < hi)
            index = torch.where(member, shortlist + k - 1, index)
            rows = member.nonzero().squeeze(1)
            within = self.tail(k, x[rows], words[k]).gather(1, (targets[rows] - lo).unsqueeze(1))
            in_tails = in_tails.index_add(0, rows, within.squeeze(1))
        return head.gather(1, index.unsqueeze(1)).squeeze(1) + in_tails
