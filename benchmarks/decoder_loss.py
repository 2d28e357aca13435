#!/usr/bin/env python
"""Forward + backward of the full-softmax training loss: the straightforward
`F.cross_entropy(F.linear(x, W, b), targets)` against the fused, chunked
`lstmlm.fused.linear_cross_entropy`, at the decoder sizes of the presets.

    python benchmarks/decoder_loss.py                        # both sizes, the default chunk
    python benchmarks/decoder_loss.py --chunks 64 128 256 512 1024 2048
    python benchmarks/decoder_loss.py --sizes awd-lstm --default-malloc --no-memory
    python benchmarks/decoder_loss.py --scoring                # forward only, as evaluation

Sizes: `lstm-baseline`, 700 rows (20 streams x 35 tokens); `awd-lstm`, 5,600 rows (80 x 70);
both a 400 -> 33,278 decoder (the last LSTM layer's 400 units onto WikiText-2's vocabulary).
Each measure is the median over --reps repetitions, the variants taking turns within each
repetition so that noise from other processes hits all alike. One repetition is a forward
and backward pass, with the gradients set to None before each, as a training step does; with
--scoring, the loss alone under torch.no_grad(), as evaluation computes it.

By default the process keeps freed memory (`lstmlm.allocator.keep_freed_memory`, as lstmlm's
training does); --default-malloc leaves glibc's malloc as it is, so that the straightforward
loss page-faults its (rows x vocabulary) tensors in again every step, as a plain PyTorch
training loop does. Peak memory (--no-memory skips it) is measured in a fresh subprocess per
variant: its resident set's high-water mark over two steps, less the resident set before them
(after a tiny warm-up step: the interpreter, the code and the model-size tensors). With freed
memory kept it also counts the blocks the allocator holds but could not reuse.

The default run takes 2-3 minutes on 2 CPU cores, most of it awd-lstm's straightforward
steps (5-10 s each).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lstmlm.allocator import keep_freed_memory
from lstmlm.fused import CHUNK_ROWS, linear_cross_entropy

SIZES = {"lstm-baseline": 700, "awd-lstm": 5600}
IN_SIZE, VOCAB = 400, 33278


def make_inputs(rows: int, vocab: int = VOCAB, in_size: int = IN_SIZE):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_size, generator=generator).requires_grad_()
    weight = torch.empty(vocab, in_size).uniform_(-0.1, 0.1, generator=generator)
    weight = torch.nn.Parameter(weight)
    bias = torch.nn.Parameter(torch.zeros(vocab))
    targets = torch.randint(vocab, (rows,), generator=generator)
    return x, weight, bias, targets


def step(inputs, chunk: int | None, scoring: bool = False) -> None:
    """One forward and backward pass (the forward alone when scoring); chunk None: the
    straightforward loss."""
    x, weight, bias, targets = inputs
    for t in (x, weight, bias):
        t.grad = None
    with torch.set_grad_enabled(not scoring):
        if chunk is None:
            loss = F.cross_entropy(F.linear(x, weight, bias), targets)
        else:
            loss = linear_cross_entropy(x, weight, bias, targets, chunk)
    if not scoring:
        loss.backward()


def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (its high-water mark) of this process, in MB. Not
    ru_maxrss: Linux carries that over from the parent through fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_mb(size: str, chunk: int | None, args) -> float:
    """Peak resident memory of two steps above the resident set before them, in a fresh
    process (the high-water mark of this one says nothing about one variant)."""
    command = [sys.executable, __file__, "--child", size, str(chunk or 0),
               "--threads", str(args.threads)]
    command += ["--default-malloc"] * args.default_malloc + ["--scoring"] * args.scoring
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout)


def child(size: str, chunk: int, args) -> None:
    step(make_inputs(16, 64, 16), chunk or None, args.scoring)
    inputs = make_inputs(SIZES[size])  # after a tiny step, which pages the code in
    before = status_mb("VmRSS")
    for _ in range(2):
        step(inputs, chunk or None, args.scoring)
    print(status_mb("VmHWM") - before)


def name(chunk: int | None) -> str:
    return "straightforward" if chunk is None else f"fused, {chunk} rows"


def bench(size: str, args) -> None:
    inputs = make_inputs(SIZES[size])
    variants = [None, *args.chunks]
    times = {chunk: [] for chunk in variants}
    for chunk in variants:  # warm-up
        step(inputs, chunk, args.scoring)
    for _ in range(args.reps):
        for chunk in variants:
            start = time.perf_counter()
            step(inputs, chunk, args.scoring)
            times[chunk].append(time.perf_counter() - start)
    base = statistics.median(times[None])
    rows = SIZES[size]
    gflop = (1 if args.scoring else 3) * 2 * rows * IN_SIZE * VOCAB / 1e9
    print(f"\n{size}: {rows} rows, {IN_SIZE} -> {VOCAB}, {gflop:.1f} GFLOP a "
          f"{'scoring pass' if args.scoring else 'step'}, median of {args.reps}")
    print(f"  {'variant':<22} {'ms':>8} {'GFLOP/s':>8} {'vs straightforward':>19}"
          + ("" if args.no_memory else f" {'peak MB':>8}"))
    for chunk in variants:
        ms = statistics.median(times[chunk]) * 1e3
        line = f"  {name(chunk):<22} {ms:8.1f} {gflop / ms * 1e3:8.1f} {base * 1e3 / ms:18.2f}x"
        if not args.no_memory:
            line += f" {peak_mb(size, chunk, args):8.0f}"
        print(line, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--chunks", nargs="+", type=int, default=[CHUNK_ROWS],
                        help=f"rows per chunk of the fused loss (default {CHUNK_ROWS})")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (a plain PyTorch loop)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--scoring", action="store_true",
                        help="time the loss alone under torch.no_grad(), as evaluation does")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.reps, args.threads, *args.chunks) < 1:
        parser.error("--reps, --threads and every --chunks value must be at least 1")
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        keep_freed_memory()
    if args.child:
        child(args.child[0], int(args.child[1]), args)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, "
          f"{'default malloc' if args.default_malloc else 'freed memory kept'}")
    for size in args.sizes:
        bench(size, args)


if __name__ == "__main__":
    main()
