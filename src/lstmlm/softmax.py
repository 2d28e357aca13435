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

from . import fused


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

    def word_logits(self, inputs: list[torch.Tensor],
                    tied_weight: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each cluster's word logits from its input, (rows, size) -> (rows, its words): the
        features for the head, their projection for a tail.

        The tied clusters take their rows of the embedding's weight (`tied_weight`, the weight
        from `fused.tied_lookup`, or the embedding itself) through `fused.split_linear`, which
        gives the embedding one gradient tensor. They are the first clusters: the projections
        only shrink, so once one is smaller than the embedding, all after it are."""
        tied = sum(self.tied)
        logits = []
        if tied:
            weight = self.embedding_weight if tied_weight is None else tied_weight
            logits = fused.split_linear(inputs[:tied], weight, self.bias,
                                        self.cluster_sizes[:tied])
        for k in range(tied, len(inputs)):
            lo, hi = self.bounds[k], self.bounds[k + 1]
            logits.append(F.linear(inputs[k], self.words[str(k)], self.bias[lo:hi]))
        return logits

    def head(self, x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the head words (whose logits are `words`), then of each tail
        cluster: (..., c1 + tails)."""
        clusters = F.linear(x, self.clusters, self.cluster_bias)
        return _log_softmax(torch.cat([words, clusters], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-probabilities over the vocabulary (..., vocab) of features (..., in_size)."""
        logits = self.word_logits([x] + [F.linear(x, p) for p in self.projections])
        head = self.head(x, logits[0])
        shortlist = self.bounds[1]
        parts = [head[..., :shortlist]]
        for k in range(1, len(logits)):
            parts.append(head[..., shortlist + k - 1, None] + _log_softmax(logits[k]))
        return torch.cat(parts, -1)

    def loss(self, x: torch.Tensor, targets: torch.Tensor,
             tied_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood of `targets` (N,) given features (N, in_size)."""
        return -self.target_log_probs(x, targets, tied_weight).mean()

    def target_log_probs(self, x: torch.Tensor, targets: torch.Tensor,
                         tied_weight: torch.Tensor | None = None) -> torch.Tensor:
        """log p(target) for each of `targets` (N,) given features (N, in_size), computing
        each tail only for the rows whose target is in it. Every tail runs, on zero rows if
        need be, so every parameter is in the graph (DistributedDataParallel expects that)."""
        shortlist = self.bounds[1]
        index = targets  # the head entry to read: the word itself, or its cluster
        inputs, tail_rows = [x], []
        for k in range(1, len(self.bounds) - 1):
            member = (targets >= self.bounds[k]) & (targets < self.bounds[k + 1])
            index = torch.where(member, shortlist + k - 1, index)
            rows = member.nonzero().squeeze(1)
            inputs.append(F.linear(x[rows], self.projections[k - 1]))
            tail_rows.append(rows)
        logits = self.word_logits(inputs, tied_weight)
        head = self.head(x, logits[0])
        in_tails = head.new_zeros(targets.shape)
        for k, rows in enumerate(tail_rows, start=1):
            within = (targets[rows] - self.bounds[k]).unsqueeze(1)  # each target's place in k
            in_tails = in_tails.index_add(0, rows, _log_softmax(logits[k]).gather(1, within)[:, 0])
        return head.gather(1, index.unsqueeze(1)).squeeze(1) + in_tails
