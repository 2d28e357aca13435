"""Perplexity: token-weighted mean cross-entropy over a split, exp of it."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import torch
from tqdm import tqdm

from .data import get_batch
from .fused import CHUNK_ROWS
from .model import LSTMLM


def progress_bar(tokens: int, label: str) -> tqdm:
    """A bar of the tokens read so far, on stderr, drawn only with a label and only while
    stderr is a terminal (never into logs or pipes)."""
    return tqdm(total=tokens, desc=label, unit="tok", unit_scale=True, dynamic_ncols=True,
                leave=False, file=sys.stderr, disable=None if label else True)


def window_starts(data: torch.Tensor, bptt: int, progress: str = "") -> Iterator[int]:
    """The first row of each `bptt` window of `data` (time, batch). With a `progress` label,
    a bar of the tokens read so far is shown while stderr is a terminal: evaluation at batch
    1, with the cache or dynamic evaluation takes minutes."""
    rows = data.size(0) - 1  # the last row is only a target
    with progress_bar(rows * data.size(1), progress) as bar:
        for i in range(0, rows, bptt):
            yield i
            bar.update(min(bptt, rows - i) * data.size(1))


@torch.no_grad()
def evaluate(model: LSTMLM, data: torch.Tensor, bptt: int,
             progress: str = "") -> tuple[float, int]:
    """Mean loss per token and number of tokens scored, on batchified `data` (time, batch).

    The hidden state is carried across windows, as in training, and the model is left in
    eval mode (no dropout): the result is deterministic. The LSTM runs window by window, but
    the decoder waits for as many windows as fit in one chunk of the fused loss (fused.py),
    since its matrix product runs faster on more rows: two windows of 350 rows at batch 10
    and bptt 35, 29 windows of 35 at batch 1 (which scored twice as many tokens a second).
    With a `progress` label, a progress bar is shown (window_starts).
    """
    model.eval()
    hidden = model.init_hidden(data.size(1))
    total, tokens = 0.0, 0
    features, targets, waiting = [], [], 0
    window_rows = bptt * data.size(1)
    for i in window_starts(data, bptt, progress):
        inputs, window_targets = get_batch(data, i, bptt)
        x, _, hidden = model.features(inputs, hidden)
        features.append(x.reshape(-1, x.size(-1)))
        targets.append(window_targets)
        waiting += window_targets.numel()
        if i + bptt >= data.size(0) - 1 or waiting + window_rows > CHUNK_ROWS:
            loss = model.output_loss(torch.cat(features), torch.cat(targets))
            total += loss.item() * waiting
            tokens += waiting
            features, targets, waiting = [], [], 0
    return total / tokens, tokens


def perplexity(loss: float) -> float:
    """exp(loss), saturating at inf instead of raising on overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
