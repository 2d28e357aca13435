"""Optimizers: SGD/Adam/AdamW, and NT-ASGD's pieces (the trigger and the weight average, which
`average_from` also uses with any optimizer).

NT-ASGD (Merity et al. 2017) trains with plain SGD until validation stops improving, then
keeps training with the same SGD steps while averaging the weights; the average is what gets
validated, saved and tested. The average is kept here explicitly rather than through
`torch.optim.ASGD`, whose `ax` state has changed meaning between PyTorch versions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .config import Config


def clip_grad_norm(parameters, max_norm: float) -> float:
    """The gradients' global norm, rescaling them to `max_norm` where it is larger, as
    `torch.nn.utils.clip_grad_norm_` does; but when nothing needs clipping it skips that
    function's multiply-by-1 pass over every gradient."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    value = norm.item()
    if value + 1e-6 > max_norm:  # clip_grad_norm_'s factor max_norm / (norm + 1e-6) is < 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return value


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    # The fused kernels do a parameter's whole update (weight decay, momentum, Adam's moments)
    # in one pass over memory instead of a chain of elementwise ops: on 2 CPU cores a step over
    # 26M parameters took 6.3 ms instead of 39 for SGD, 13 instead of 93 for Adam
    # (benchmarks/kernels.py).
    fused = params[0].device.type in ("cpu", "cuda")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def nonmono_triggered(history: list[float], loss: float, nonmono: int) -> bool:
    """True when `loss` is worse than the best of the checks made more than `nonmono` checks
    ago (`history` holds the earlier checks' losses, oldest first)."""
    return len(history) > nonmono and loss > min(history[:-nonmono])


class WeightAverage:
    """Running mean of the model's parameters over the optimizer steps since it was created."""

    def __init__(self, model: torch.nn.Module):
        self.params = dict(model.named_parameters())
        self.mean = {k: p.detach().clone() for k, p in self.params.items()}
        self.count = 0

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        for name, p in self.params.items():
            self.mean[name].lerp_(p, 1.0 / self.count)

    @contextmanager
    def swapped_in(self):
        """Temporarily give the model the averaged weights (to validate or save them)."""
        with torch.no_grad():
            current = {k: p.detach().clone() for k, p in self.params.items()}
            for k, p in self.params.items():
                p.copy_(self.mean[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(current[k])
