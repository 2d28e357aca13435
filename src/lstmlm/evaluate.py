"""Perplexity: token-weighted mean cross-entropy over a split, exp of it."""

from __future__ import annotations

import math

import torch

from .data import get_batch
from .model import LSTMLM


@torch.no_grad()
def evaluate(model: LSTMLM, data: torch.Tensor, bptt: int) -> tuple[float, int]:
    """Mean loss per token and number of tokens scored, on batchified `data` (time, batch).

    The hidden state is carried across windows, as in training, and the model is left in
    eval mode (no dropout): the result is deterministic. The loss is the model's training
    loss, so the full softmax never holds more than a chunk of logits (fused.py).
    """
    model.eval()
    hidden = model.init_hidden(data.size(1))
    total, tokens = 0.0, 0
    for i in range(0, data.size(0) - 1, bptt):
        inputs, targets = get_batch(data, i, bptt)
        loss, _, hidden = model.loss(inputs, targets, hidden)
        total += loss.item() * targets.numel()
        tokens += targets.numel()
    return total / tokens, tokens


def perplexity(loss: float) -> float:
    """exp(loss), saturating at inf instead of raising on overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
