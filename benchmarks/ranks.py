#!/usr/bin/env python
"""Training tokens/s of data-parallel lstmlm with 1, 2, ... processes on this machine.

    LSTMLM_DATA=../shared/data python benchmarks/ranks.py                 # lstm-baseline, 1 and 2
    python benchmarks/ranks.py --preset awd-lstm-cpu --ranks 1 2 --steps 40 --json

Each count of processes runs `torchrun --standalone --nproc_per_node N -m lstmlm train` (gloo on
CPU; torchrun gives each of several processes one thread, a single process keeps torch's
default of one thread per core) on WikiText-2's training split, validating every
`--steps / 4` steps on the first 20,000 tokens of the validation split, so that the
validations are short. The figure is the median of the training speed of the windows between
validations, after the first (warm-up) window; lstmlm logs that speed (step time only) in
metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lstmlm.data import read_splits
from lstmlm.datasets import resolve_data
from lstmlm.errors import LstmlmError


def first_tokens(lines: list[str], limit: int) -> list[str]:
    """The first lines that hold `limit` tokens (words and <eos>), or all of them."""
    tokens = 0
    for i, line in enumerate(lines):
        tokens += len(line.split()) + 1
        if tokens >= limit:
            return lines[:i + 1]
    return lines


def small_eval_copy(data: Path, folder: Path) -> Path:
    """The corpus (a directory or one text file) as a directory with its full training split
    and short validation and test splits."""
    folder.mkdir()
    for split, lines in read_splits(data).items():
        if split != "train":
            lines = first_tokens(lines, 20_000)
        (folder / f"{split}.txt").write_text("".join(f"{line}\n" for line in lines),
                                             encoding="utf-8")
    return folder


def tokens_per_s(ranks: int, preset: str, data: Path, steps: int, out: Path,
                 extra: list[str]) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", "-m", "lstmlm", "train", "--preset", preset,
               "--data", str(data), "--out", str(out), "--max-steps", str(steps),
               "--eval-interval", str(max(1, steps // 4)), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"ranks.py: {ranks} process(es) failed:\n{done.stderr[-2000:]}")
    windows = [json.loads(line)["tokens_per_s"]
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(windows[1:] or windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="lstm-baseline")
    parser.add_argument("--data", default="wikitext-2",
                        help="data directory, one text file or dataset name")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=200, help="training steps per count")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.steps < 1 or min(args.ranks) < 1:  # --max-steps 0 would mean no limit
        parser.error("--steps and every --ranks count must be at least 1")
    extra = [arg for assignment in args.set for arg in ("--set", assignment)]
    with tempfile.TemporaryDirectory() as tmp:
        data = small_eval_copy(resolve_data(args.data), Path(tmp) / "data")
        speeds = {n: tokens_per_s(n, args.preset, data, args.steps, Path(tmp) / f"run{n}", extra)
                  for n in args.ranks}
    base = speeds[args.ranks[0]]
    rows = [{"ranks": n, "tokens_per_s": round(s, 1), "per_rank": round(s / n, 1),
             "speedup": round(s / base, 2)} for n, s in speeds.items()]
    if args.json:
        print(json.dumps({"preset": args.preset, "steps": args.steps, "cpus": os.cpu_count(),
                          "results": rows}))
        return
    print(f"{args.preset}, {args.steps} steps per count, {os.cpu_count()} CPUs")
    print(f"{'ranks':>5} {'tokens/s':>10} {'per rank':>10} {'speed-up':>9}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['tokens_per_s']:>10,.0f} {r['per_rank']:>10,.0f} "
              f"{r['speedup']:>8.2f}x")


if __name__ == "__main__":
    try:
        main()
    except LstmlmError as e:
        sys.exit(f"ranks.py: error: {e}")
