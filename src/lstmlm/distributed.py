"""Data-parallel training over processes started by `torchrun` (DistributedDataParallel).

Each rank trains `batch_size / world_size` of the batch's parallel token streams; DDP averages
the gradients, so every rank holds the same weights after every step. Everything the ranks must
agree on comes from one place:
- the global torch RNG is seeded identically on every rank, so the draws that concern the whole
  batch (the BPTT length, weight-drop and embedding-dropout masks) are the same everywhere, as
  in a single process;
- the masks of single streams (variational and ordinary dropout) come from a per-rank generator
  reseeded from (seed, rank, step), so ranks do not repeat each other's masks;
- the clock and the stop signal are reduced (max) every step, so budgets stop all ranks together;
- validation and test shard the streams and sum the losses, so their perplexity equals the
  single-process value; only rank 0 writes files, with the hidden state of all ranks gathered.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ConfigError


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device: torch.device) -> tuple[Group, torch.device]:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on
    CPU); each rank of a node gets its own GPU. Without torchrun: one process, as given."""
    world_size = launched_world_size()
    if world_size == 1:
        return Group(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        with _signals_to_this_thread():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Group(dist.get_rank(), world_size), device


@contextlib.contextmanager
def _signals_to_this_thread():
    """Threads started inside (the process group's I/O threads) block SIGINT and SIGTERM, so
    a Ctrl-C or SIGTERM reaches the main thread's handler (train.py) and never interrupts a
    socket call in one of them (gloo aborts the process on that)."""
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)


def columns(data: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's share of the streams (columns) of batchified data; may be empty when there
    are fewer streams than ranks."""
    return torch.tensor_split(data, group.world_size, dim=1)[group.rank]


def check_divisible(batch_size: int, group: Group) -> None:
    if batch_size % group.world_size:
        raise ConfigError(f"batch_size {batch_size} does not split evenly over "
                          f"{group.world_size} processes; use a multiple of {group.world_size}")


def reduce(values: list[float], group: Group, op: str = "sum",
           device: torch.device | str = "cpu") -> list[float]:
    """The element-wise sum, mean or max of `values` over all ranks."""
    if not group.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return (t / group.world_size if op == "mean" else t).tolist()


def gather_columns(t: torch.Tensor, group: Group) -> torch.Tensor:
    """All ranks' equal shares of a (..., batch, ...) tensor, concatenated along dim 1."""
    if not group.active:
        return t
    parts = [torch.empty_like(t) for _ in range(group.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=1)


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()


def leave(group: Group) -> None:
    """Wait for every rank, then shut the process group down, so that no rank tears its
    connections down at exit while another is still writing the checkpoint. (A rank can still,
    rarely, abort at exit in gloo's teardown: "terminate called without an active exception",
    after its work is done; `python -m lstmlm` skips that teardown, __main__.py.)"""
    if group.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class LossOf(nn.Module):
    """DDP synchronises gradients only for what runs through its wrapped module's forward,
    so the wrapped module's forward is the model's training loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, hidden):
        return self.model.loss(tokens, targets, hidden)


def wrap(model: nn.Module, group: Group, device: torch.device):
    """The function that computes the training loss: the model's own, or through DDP."""
    if not group.active:
        return model.loss
    with _signals_to_this_thread():
        # The model has no buffers, so DDP's buffer broadcast (on by default) has nothing to do.
        return nn.parallel.DistributedDataParallel(
            LossOf(model), device_ids=[device] if device.type == "cuda" else None)


def mask_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the per-rank stream-mask generator at a step: distinct for every (rank, step),
    and recomputed rather than saved, so a resumed run draws the same masks. Taken modulo
    2**64, so that any seed the config accepts gives one a generator accepts."""
    return ((seed * 1_000_003 + step) * 4_096 + rank) % 2**64
