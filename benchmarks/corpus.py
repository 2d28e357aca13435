#!/usr/bin/env python
"""Time and memory to tokenize a corpus (the first run on new data) and to load it from the
tokenized cache (every later run), each in a fresh process.

    python benchmarks/corpus.py                          # synthetic, 20M tokens
    python benchmarks/corpus.py --tokens 103e6           # WikiText-103's size (about 3 GB)
    LSTMLM_DATA=../shared/data python benchmarks/corpus.py --data wikitext-2
    python benchmarks/corpus.py --against ../other/src   # also another checkout's lstmlm

The synthetic corpus has WikiText-103's shape: Zipf-distributed words over a 267,735-word
vocabulary (fewer are drawn at small sizes), lines of about 57 tokens, valid and test 2 % of
train each. Each load ends by reading every token once, as training does. Peak memory is how
far the process's resident set rose above where it stood before loading (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from lstmlm.datasets import resolve_data

WT103_VOCAB = 267_735
WORDS_PER_LINE = 56

# Run in a fresh process: load the corpus and read every token once (a cached corpus is only
# mapped until then); print the seconds, and how far the resident set rose above where it was
# before (Linux: /proc/self/statm, and the kernel's high-water mark).
LOAD = """
import json, os, resource, sys, time
from lstmlm.data import load_corpus
page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
before = int(open("/proc/self/statm").read().split()[1]) * page_mb
start = time.perf_counter()
corpus = load_corpus(sys.argv[1])
sum(int(corpus.split(s).sum()) for s in ("train", "valid", "test"))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mb": peak - before,
                  "train_tokens": corpus.train.numel()}))
"""


def write_synthetic(directory: Path, tokens: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, WT103_VOCAB + 1)
    weights /= weights.sum()
    words = np.array([f"w{i}" for i in range(WT103_VOCAB)])
    directory.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", tokens), ("valid", tokens // 50), ("test", tokens // 50)):
        with open(directory / f"{split}.txt", "w", encoding="utf-8") as f:
            for start in range(0, size, 1_000_000):
                drawn = words[rng.choice(WT103_VOCAB, min(1_000_000, size - start), p=weights)]
                for i in range(0, len(drawn), WORDS_PER_LINE):
                    f.write(" " + " ".join(drawn[i: i + WORDS_PER_LINE]) + " \n")
    return directory


def load_in_fresh_process(data: str, cache: Path, src: str | None) -> dict:
    env = {**os.environ, "LSTMLM_CACHE": str(cache)}
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", LOAD, data], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def measure(data: str, scratch: Path, src: str | None, label: str) -> dict:
    cache = scratch / f"cache-{label}"
    first = load_in_fresh_process(data, cache, src)
    cached = load_in_fresh_process(data, cache, src)
    return {"tokenize_s": round(first["seconds"], 2),
            "tokenize_peak_mb": round(first["peak_mb"]),
            "cached_load_s": round(cached["seconds"], 2),
            "cached_peak_mb": round(cached["peak_mb"]),
            "train_tokens": first["train_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=20e6,
                        help="training tokens of the synthetic corpus (default 20e6)")
    parser.add_argument("--data", help="a data directory or dataset name instead")
    parser.add_argument("--against", metavar="SRC",
                        help="also measure lstmlm imported from SRC (another checkout's src/)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if args.data:
            data = str(resolve_data(args.data))
        else:
            data = str(write_synthetic(scratch / "corpus", int(args.tokens)))
        results = {"this": measure(data, scratch, None, "this")}
        if args.against:
            results["against"] = measure(data, scratch, str(Path(args.against).resolve()),
                                         "against")
    if args.json:
        print(json.dumps(results))
        return
    for label, r in results.items():
        print(f"{label}: {r['train_tokens']:,} training tokens | tokenize {r['tokenize_s']} s, "
              f"peak {r['tokenize_peak_mb']:,} MB | from the cache {r['cached_load_s']} s, "
              f"peak {r['cached_peak_mb']:,} MB")


if __name__ == "__main__":
    main()
