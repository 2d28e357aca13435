#!/usr/bin/env python
"""Best perplexity in a fixed wall-clock budget: train a preset on a corpus for --minutes of
training time on this machine, then report the best validation and the test perplexity.

    LSTMLM_DATA=../shared/data python benchmarks/budget.py --preset awd-lstm-cpu --minutes 60
    python benchmarks/budget.py --preset lstm-baseline --minutes 60 --set batch_size=40 --json
    python benchmarks/budget.py --preset wt2-cpu-hour --minutes 60 --cache

With --cache the best weights are also scored on the test split with the neural cache pointer
at its default settings (batch size 1, as `lstmlm evaluate RUN --split test --cache`).

The run directory (default: a temporary one, removed afterwards) is an ordinary lstmlm run, so
with --out it can be evaluated, sampled or resumed later. The budget is lstmlm's `max_minutes`:
training time including the validations made during training, summed over resumes; the final
validation and the test evaluation come after it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from lstmlm.cache import cache_evaluate
from lstmlm.checkpoint import load_run
from lstmlm.cli import print_json
from lstmlm.config import load_preset, parse_assignment
from lstmlm.data import batchify, read_split
from lstmlm.datasets import resolve_data
from lstmlm.errors import LstmlmError
from lstmlm.evaluate import perplexity
from lstmlm.train import run_training


def cache_test_ppl(run_dir: Path) -> float:
    """Test perplexity of the run's best weights with the cache pointer, default settings."""
    cfg, vocab, model = load_run(run_dir)
    _, lines = read_split(resolve_data(cfg.data, recorded=True), "test")
    ids, _ = vocab.encode(line.split() for line in lines)
    loss, _ = cache_evaluate(model, batchify(ids, 1), cfg.bptt)
    return perplexity(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="awd-lstm-cpu")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--data", default="wikitext-2",
                        help="data directory, text file or dataset name")
    parser.add_argument("--out", help="keep the run directory here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--cache", action="store_true",
                        help="also report the test perplexity with the cache pointer")
    args = parser.parse_args()
    if not args.minutes > 0:  # max_minutes 0 would mean no limit
        parser.error(f"--minutes must be above 0, got {args.minutes}")
    cfg = load_preset(args.preset)
    overrides = dict(parse_assignment(a) for a in args.set)
    overrides.update(data=args.data, max_minutes=args.minutes)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "run"
        results = run_training(cfg, out=out, overrides=overrides, quiet=args.json)
        summary = {"preset": args.preset, "minutes": args.minutes, "cpus": os.cpu_count(),
                   **{k: results[k] for k in ("epochs", "steps", "train_tokens_per_s",
                                              "best_valid_ppl", "test_ppl", "parameters")}}
        if args.cache:
            summary["test_ppl_cache"] = cache_test_ppl(out)
    if args.json:
        print_json(summary)  # a diverged run's inf as null
    else:
        print(f"{args.preset} on {args.data}, {args.minutes:g} minutes, {os.cpu_count()} CPUs: "
              f"{summary['epochs']} epochs, {summary['train_tokens_per_s']:,.0f} tokens/s | "
              f"best valid ppl {summary['best_valid_ppl']:.2f} | test ppl {summary['test_ppl']:.2f}"
              + (f" | with the cache {summary['test_ppl_cache']:.2f}" if args.cache else ""))


if __name__ == "__main__":
    try:
        main()
    except LstmlmError as e:
        sys.exit(f"budget.py: error: {e}")
