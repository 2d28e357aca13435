"""Continuous cache pointer (Grave, Joulin, Usunier 2017, "Improving Neural Language Models with
a Continuous Cache"), applied at test time as in AWD-LSTM's pointer.py.

The last layer's output h_t (before dropout; in eval mode there is none) attends over the
previous `window` outputs h_i, and each h_i points at the word that followed it, x_{i+1}:

    p(w) = (1 - lambda) p_model(w) + lambda p_cache(w)
    p_cache(w) = sum over i in the window with x_{i+1} = w of softmax_i(theta * h_t . h_i)

Nothing is trained: the cache is the recent history of the text being scored, so a word (or a
name) that was just used becomes likely again. Differences from pointer.py: the cache is used
as soon as it holds one state (pointer.py waits until the window is full), and with batched
data each stream keeps its own cache. Only the target's probability is needed for the loss,
so p_cache is never built over the vocabulary.
"""

from __future__ import annotations

import math

import torch

from .data import get_batch
from .errors import LstmlmError
from .evaluate import window_starts
from .model import LSTMLM

# Grave et al.'s / AWD-LSTM's values for WikiText-2.
DEFAULT_WINDOW = 3785
DEFAULT_THETA = 0.662
DEFAULT_LAMBDA = 0.1279
# `--cache-search` grid: one pass over the data per search, whatever the grid's size.
SEARCH_THETAS = (0.1, 0.3, 0.662, 1.0)
SEARCH_LAMBDAS = (0.05, 0.1, 0.1279, 0.2, 0.3)


def check_cache(window: int, theta: float, lambd: float) -> None:
    if window < 1:
        raise LstmlmError(f"cache window must be at least 1 (hidden states), got {window}")
    if not (theta >= 0 and math.isfinite(theta)):  # also refuses nan
        raise LstmlmError(f"cache theta must be a number >= 0, got {theta}")
    if not 0 <= lambd <= 1:
        raise LstmlmError(f"cache lambda must be in [0, 1], got {lambd}")


@torch.no_grad()
def model_and_cache_log_probs(model: LSTMLM, data: torch.Tensor, bptt: int, window: int,
                              thetas, progress: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """log p_model and log p_cache (one row per theta) of every target of `data` (time, batch),
    flattened time-major as `evaluate` counts them. One pass over the data serves any number of
    thetas and lambdas. Where a stream has no history yet, log p_cache is log p_model. With a
    `progress` label, a progress bar is shown (evaluate.window_starts)."""
    model.eval()
    if data.dim() == 1:
        data = data.unsqueeze(1)
    window = min(window, data.size(0))  # a longer window holds no more (and overflows int64)
    hidden = model.init_hidden(data.size(1))
    past_h = past_y = None  # the last `window` outputs (M, batch, size) and next words (M, batch)
    model_lp, cache_lp = [], []
    for i in window_starts(data, bptt, progress):
        inputs, targets = get_batch(data, i, bptt)
        targets = targets.view_as(inputs)  # (T, batch)
        _, h, hidden = model.features(inputs, hidden)
        lp = model.target_log_probs(h, targets)
        keys = h if past_h is None else torch.cat([past_h, h])
        values = targets if past_y is None else torch.cat([past_y, targets])
        steps, m = inputs.size(0), keys.size(0) - inputs.size(0)
        # Query t (position m + t in keys) sees keys m + t - window .. m + t - 1.
        t = torch.arange(steps, device=h.device).unsqueeze(1) + m
        j = torch.arange(keys.size(0), device=h.device)
        visible = (j < t) & (j >= t - window)  # (T, M + T)
        match = values.t().unsqueeze(1) == targets.t().unsqueeze(2)  # (batch, T, M + T)
        scores = torch.einsum("tbd,jbd->btj", h, keys)
        has_history = visible.any(-1).unsqueeze(1)  # (T, 1): false only for the very first target
        rows = []
        for theta in thetas:
            log_attn = torch.log_softmax((theta * scores).masked_fill(~visible, -math.inf), -1)
            cached = torch.logsumexp(log_attn.masked_fill(~match, -math.inf), -1).t()  # (T, batch)
            rows.append(torch.where(has_history, cached, lp))
        model_lp.append(lp.flatten())
        cache_lp.append(torch.stack(rows).flatten(1))
        past_h, past_y = keys[-window:], values[-window:]
    return torch.cat(model_lp).double(), torch.cat(cache_lp, 1).double()


def mixture_loss(model_lp: torch.Tensor, cache_lp: torch.Tensor, lambd: float) -> float:
    """Mean of -log((1 - lambda) p_model + lambda p_cache), in log space (no underflow)."""
    lam = torch.tensor(float(lambd), dtype=torch.float64)
    lp = torch.logaddexp(model_lp + torch.log1p(-lam), cache_lp + lam.log())
    return -lp.mean().item()


def cache_evaluate(model: LSTMLM, data: torch.Tensor, bptt: int, window: int = DEFAULT_WINDOW,
                   theta: float = DEFAULT_THETA,
                   lambd: float = DEFAULT_LAMBDA, progress: str = "") -> tuple[float, int]:
    """Mean loss per token and tokens scored with the cache, on `data` (time, batch) or a 1-D
    token stream (batch 1, the reference setting). The hidden state is carried across windows,
    and the result does not depend on `bptt`."""
    check_cache(window, theta, lambd)
    model_lp, cache_lp = model_and_cache_log_probs(model, data, bptt, window, [theta], progress)
    return mixture_loss(model_lp, cache_lp[0], lambd), model_lp.numel()


def cache_search(model: LSTMLM, data: torch.Tensor, bptt: int, window: int = DEFAULT_WINDOW,
                 thetas=SEARCH_THETAS, lambdas=SEARCH_LAMBDAS, progress: str = "") -> list[dict]:
    """Loss of every (theta, lambda) of the grid on `data`, best first; one pass over the data."""
    for theta in thetas:
        for lambd in lambdas:
            check_cache(window, theta, lambd)
    model_lp, cache_lp = model_and_cache_log_probs(model, data, bptt, window, thetas, progress)
    grid = [{"theta": theta, "lambda": lambd, "loss": mixture_loss(model_lp, cache_lp[k], lambd)}
            for k, theta in enumerate(thetas) for lambd in lambdas]
    return sorted(grid, key=lambda r: r["loss"])
