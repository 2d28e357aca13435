"""Dynamic evaluation (Krause, Kahembwe, Murray, Renals 2018, "Dynamic Evaluation of Neural
Sequence Models"): the weights adapt to the text being scored, one short segment at a time.

Each segment is scored first (that loss is what the perplexity counts), then the weights take
one step on it, the paper's "SGD with RMS normalisation" and its RMS global prior:

    theta <- theta - lr * grad / (rms + eps)
                   + decay * min(rms / mean(rms), 1 / decay) * (theta_0 - theta)

rms is the root mean squared gradient of each weight over a few training batches: the step is
about `lr` for every weight whatever its gradient's scale, and weights whose gradients are
usually large are pulled back harder toward the trained weights theta_0. Everything happens on
a copy: the model passed in (and the run on disk) is never changed.
"""

from __future__ import annotations

import copy
import math

import torch

from .data import batchify, get_batch
from .errors import LstmlmError
from .evaluate import window_starts
from .model import LSTMLM, detach

# The paper's AWD-LSTM hyperparameters (mean squared statistics), segments of 5 tokens.
DEFAULT_LR = 5e-5
DEFAULT_DECAY = 0.002
DEFAULT_EPSILON = 2e-5
DEFAULT_BPTT = 5
DEFAULT_STAT_BATCHES = 100  # training batches (of STAT_BATCH_SIZE x bptt tokens) for rms
STAT_BATCH_SIZE = 100


def check_dynamic(lr: float, decay: float, bptt: int, stat_batches: int,
                  epsilon: float = DEFAULT_EPSILON) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise LstmlmError(f"dynamic evaluation learning rate must be > 0, got {lr}")
    if not 0 <= decay <= 1:
        raise LstmlmError(f"dynamic evaluation decay must be in [0, 1], got {decay}")
    if bptt < 1:
        raise LstmlmError(f"dynamic evaluation segment length must be at least 1, got {bptt}")
    if stat_batches < 1:
        raise LstmlmError(f"dynamic evaluation needs at least 1 training batch for its "
                          f"gradient statistics, got {stat_batches}")
    if not epsilon > 0:
        raise LstmlmError(f"dynamic evaluation epsilon must be > 0, got {epsilon}")


def adaptable_copy(model: LSTMLM) -> LSTMLM:
    """A copy in eval mode (no dropout, no weight drop) that can still back-propagate: cuDNN
    only runs an LSTM's backward in training mode, and the LSTMs' own dropout is 0."""
    model = copy.deepcopy(model).eval()
    for layer in model.layers:
        layer.train()
        # A copy's weights lie apart; on a GPU cuDNN would gather them at every call, and warn.
        layer.flatten_parameters()
    return model


def gradient_rms(model: LSTMLM, train: torch.Tensor, bptt: int,
                 max_batches: int = DEFAULT_STAT_BATCHES) -> list[torch.Tensor]:
    """Root mean squared gradient of each parameter over the first `max_batches` windows of
    batchified training data, in eval mode. Leaves gradients in `model`: pass a copy."""
    squares = [torch.zeros_like(p) for p in model.parameters()]
    hidden = model.init_hidden(train.size(1))
    batches = 0
    for i in range(0, train.size(0) - 1, bptt):
        inputs, targets = get_batch(train, i, bptt)
        loss, _, hidden = model.loss(inputs, targets, detach(hidden))
        model.zero_grad()
        loss.backward()
        for s, p in zip(squares, model.parameters()):
            s += p.grad ** 2
        batches += 1
        if batches == max_batches:
            break
    return [(s / batches).sqrt() for s in squares]


def dynamic_evaluate(model: LSTMLM, data: torch.Tensor, train: torch.Tensor,
                     bptt: int = DEFAULT_BPTT, lr: float = DEFAULT_LR,
                     decay: float = DEFAULT_DECAY, stat_batches: int = DEFAULT_STAT_BATCHES,
                     epsilon: float = DEFAULT_EPSILON, progress: str = "") -> tuple[float, int]:
    """Mean loss per token and tokens scored on `data` (time, batch; batch 1 is the paper's
    setting, a larger batch shares one adapting copy between the streams), with the gradient
    statistics from `train` (a 1-D token stream). `model` is left as it was. With a
    `progress` label, a progress bar is shown (evaluate.window_starts)."""
    check_dynamic(lr, decay, bptt, stat_batches, epsilon)
    if data.dim() == 1:
        data = data.unsqueeze(1)
    model = adaptable_copy(model)
    with torch.enable_grad():
        stat_batch = max(1, min(STAT_BATCH_SIZE, train.numel() // (bptt + 1)))
        rms = gradient_rms(model, batchify(train, stat_batch), bptt, stat_batches)
        mean = torch.cat([r.flatten() for r in rms]).mean()
        # Per-weight constants of the step, so it is two fused passes over the weights:
        # theta <- lerp(theta, theta_0, rate) - scale * grad.
        rates = [(decay * r / mean).clamp(max=1.0) for r in rms]  # decay * min(r/mean, 1/decay)
        scales = [lr / (r + epsilon) for r in rms]
        del rms
        params = list(model.parameters())
        trained = [p.detach().clone() for p in params]
        hidden = model.init_hidden(data.size(1))
        total, tokens = 0.0, 0
        for i in window_starts(data, bptt, progress):
            inputs, targets = get_batch(data, i, bptt)
            loss, _, hidden = model.loss(inputs, targets, detach(hidden))
            total += loss.item() * targets.numel()  # scored before the step that learns from it
            tokens += targets.numel()
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p, p0, rate, scale in zip(params, trained, rates, scales):
                    p.lerp_(p0, rate).addcmul_(p.grad, scale, value=-1)
    return total / tokens, tokens
