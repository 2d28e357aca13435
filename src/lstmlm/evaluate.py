"""Perplexity: token-weighted mean cross-entropy over a split, exp of it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import get_batch
from .model import LSTMLM


@torch.no_grad()
def evaluate(model: LSTMLM, data: torch.Tensor, bptt: int) -> tuple[float, int]:
    """Mean loss per token and number of tokens scored, on batchified `data` (time, batch).

    The hidden state is carried across windows, as in training, and the model is left in
    eval mode (no dropout): the result is deterministic.
    """
    model.eval()
    hidden = model.init_hidden(data.size(1))
    total, tokens = 0.0, 0
    for i in range(0, data.size(0) - 1, bptt):
        inputs, targets = get_batch(data, i, bptt)
        logits, hidden = model(inputs, hidden)
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), targets, reduction="sum").item()
        tokens += targets.numel()
    return total / tokens, tokens


def perplexity(loss: float) -> float:
    """exp(loss), saturating at inf instead of raising on overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
