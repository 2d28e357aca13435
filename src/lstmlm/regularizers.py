"""AWD-LSTM's regularizers (Merity et al. 2017), each a plain function of tensors.

The dropouts are identity functions when not training, and the model adds the AR/TAR penalty
only in training, so evaluation is deterministic.
"""

from __future__ import annotations

import math

import torch


def keep_mask(shape: tuple[int, ...], p: float, like: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """1/(1-p) with probability 1-p, else 0, of like's dtype and device.

    Drawn as random 16-bit integers, four from each 64-bit draw, kept when at or above p's
    place in their range (so p is rounded to a multiple of 1/65536): one random draw per four
    elements instead of one per element for float uniforms compared with p. On CPU it takes
    about half the time of bernoulli_, which F.dropout uses (benchmarks/kernels.py)."""
    count = math.prod(shape)
    bits = torch.empty((count + 3) // 4, dtype=torch.int64, device=like.device)
    bits.random_(-2**63, 2**63 - 1, generator=generator)
    words = bits.view(torch.int16)[:count].view(shape)
    return words.ge(round(p * 65536) - 32768).to(like.dtype).div_(1 - p)


def dropout(x: torch.Tensor, p: float, training: bool,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Ordinary dropout (a new mask per element and step), from `generator` when given."""
    if not training or p == 0:
        return x
    return x * keep_mask(x.shape, p, x, generator)


def locked_dropout(x: torch.Tensor, p: float, training: bool,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Variational dropout: one mask per sequence, shared by all time steps.

    `x` is (time, batch, features); the mask is (1, batch, features), scaled by 1/(1-p).
    """
    if not training or p == 0:
        return x
    return x * keep_mask((1, x.size(1), x.size(2)), p, x, generator)


def embedding_dropout_mask(weight: torch.Tensor, p: float,
                           training: bool) -> torch.Tensor | None:
    """Embedding dropout, which drops whole word types, as a scale of the embedding's rows
    (vocab, 1): 0 for a dropped word, 1/(1-p) for a kept one; None when not dropping.

    A dropped word is dropped at every position of the batch where it occurs. The model scales
    only the rows it looks up (the same numbers as scaling the whole matrix)."""
    if not training or p == 0:
        return None
    return keep_mask((weight.size(0), 1), p, weight)


def drop_connect(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """DropConnect on a weight matrix (AWD-LSTM's weight drop on `weight_hh`): one mask per
    call, so one per forward pass, shared by every time step of the fused LSTM kernel."""
    return weight * keep_mask(weight.shape, p, weight) if training and p > 0 else weight


def activation_penalty(dropped_output: torch.Tensor, raw_output: torch.Tensor,
                       alpha: float, beta: float) -> torch.Tensor:
    """AR + TAR on the last LSTM layer's output (time, batch, features):

    AR  = alpha * mean(dropped_output²)          keeps activations small
    TAR = beta  * mean((h_t - h_{t-1})²)         keeps them slowly changing (on the raw output)
    """
    dropped_output, raw_output = dropped_output.float(), raw_output.float()  # fp32 under autocast
    penalty = dropped_output.new_zeros(())
    if alpha:
        penalty = penalty + alpha * dropped_output.pow(2).mean()
    if beta and raw_output.size(0) > 1:
        penalty = penalty + beta * (raw_output[1:] - raw_output[:-1]).pow(2).mean()
    return penalty
