#!/usr/bin/env python
"""Training and evaluation throughput of lstmlm, next to a plain PyTorch yardstick.

Run it from the repository root, with lstmlm installed (`pip install -e .`):

    LSTMLM_DATA=../shared/data python benchmarks/throughput.py      # the three presets, a table
    python benchmarks/throughput.py --quick                          # smoke test, a few steps
    python benchmarks/throughput.py --preset awd-lstm-cpu --json     # a JSON object per preset
    python benchmarks/throughput.py --preset awd-lstm --weight-drop-cost
    python benchmarks/throughput.py --preset lstm-baseline --compile
    python benchmarks/throughput.py --preset wt2-cpu-hour --against ../before/src
    python benchmarks/throughput.py --preset lstm-baseline --threads 1 --set batch_size=64
    python benchmarks/throughput.py --device cuda                    # on a GPU

For each preset (default lstm-baseline, awd-lstm, awd-lstm-cpu; on WikiText-2, found like
`lstmlm train` finds it: `--data DIR` or a name under $LSTMLM_DATA) it measures

- training tokens/s of lstmlm's real training step, `Trainer.train_step` (variable BPTT,
  `LSTMLM.loss` with the preset's regularizers, backward, clipping, the optimizer step) on a
  `Trainer` built from the preset;
- evaluation tokens/s (`lstmlm.evaluate.evaluate`) at the preset's validation batch size (10)
  and at batch size 1 (AWD-LSTM's test setting), on BPTT windows of the validation split, as many
  as `evaluate` scores together (up to a chunk of the fused loss), whole groups of them;
- peak memory of each phase: the resident set's high-water mark (VmHWM, reset before each
  window through /proc/self/clear_refs; where that is refused, ru_maxrss of the whole process);
  with --device cuda, the peak GPU memory torch allocated;
- the fraction of the machine's fp32 matrix-multiply peak, itself measured in the same run:
  the best GFLOP/s of a --gemm-size square `torch.mm` at the same thread count, timed after
  every round of training windows and of evaluation windows (the best, not the median: on a
  shared machine other processes only ever slow a sample down, so the fractions err low).
  A training step counts 3x the forward matrix FLOPs, evaluation 1x; forward FLOPs per token are
  2*4*(in+hidden)*hidden per LSTM layer plus 2*in*vocabulary for the decoder, read off the
  actual model's layers;
- a yardstick: the same training numbers for a plain PyTorch step of the same size, as
  pytorch/examples' word_language_model does it: nn.Embedding -> nn.LSTM (a ModuleList of
  nn.LSTMs where layer sizes differ) -> nn.Linear -> F.cross_entropy -> clip -> SGD step,
  fixed BPTT, no dropout or other regularizers; and the same plain step again with glibc's
  malloc told to keep freed memory through the environment (MALLOC_MMAP_MAX_=0,
  MALLOC_TRIM_THRESHOLD_=68719476736), the tuning that speeds such peer code up the most.

lstmlm tunes the process's malloc (`lstmlm.allocator.keep_freed_memory`, applied by
`Trainer`), and the first yardstick should keep the default allocator, so each runs in its own
long-lived worker subprocess (this script, re-invoked with a hidden flag). The parent drives
them over pipes one window at a time, alternating lstmlm, plain, tuned plain, GEMM, lstmlm, ...
so that noise from other processes on the machine hits all alike; each figure is the median
over --windows windows, after --warmup steps. `--weight-drop-cost` adds a fourth worker, lstmlm
with weight_drop=0, to the rotation of the presets that use weight drop; `--compile` one whose
step runs `Trainer.training_loss` (the model's forward and loss) under torch.compile, the
backward being compiled with it; `--against SRC` one
that imports lstmlm from SRC (another checkout's src/ directory), which compares the training
step of two versions of the code in one run.

Window sizes are picked per preset from a FLOP budget (a training window is about 150 GFLOP:
2 steps of lstm-baseline, 1 step of awd-lstm-cpu or awd-lstm); --steps and --warmup override
them. On 2 idle CPU cores, where awd-lstm trains at ~900 tokens/s and its plain yardstick at
~450 (~6 and ~12 s a step of 80 x 70 tokens), the default run takes about 8 minutes, more than
half of it awd-lstm; --quick (one warm-up step, then one window of one step per measure: a
smoke test, not a measurement) about 1.5 minutes. Twice as long when another process is using
the cores. With --device cuda the budgets are GPU_WORK_SCALE (100) times larger: at the rates
measured on an H200 (docs/performance.md) a window then lasts 0.5-4 s. --steps, --warmup and
--eval-windows set the windows by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lstmlm.config import Config, load_preset, parse_assignment
from lstmlm.data import batchify, get_batch, load_corpus
from lstmlm.datasets import resolve_data
from lstmlm.evaluate import evaluate
from lstmlm.fused import CHUNK_ROWS
from lstmlm.model import pick_device
from lstmlm.train import Trainer

PRESETS = ("lstm-baseline", "awd-lstm", "awd-lstm-cpu")
TRAIN_WINDOW_GFLOP = 150.0  # default work per training window
EVAL_WINDOW_GFLOP = 50.0  # about the work of an evaluation measure, at either batch size
# A GPU does that work some hundred times faster (an H200: docs/performance.md), so there each
# window gets this many times more of it and lasts 0.5-4 s at an H200's rates.
GPU_WORK_SCALE = 100
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


# ---- measuring ----------------------------------------------------------------------------

def forward_flops_per_token(model: nn.Module) -> int:
    """Matrix FLOPs of one token's forward pass: the LSTM gates and the decoder."""
    flops = 0
    for module in model.modules():
        if isinstance(module, nn.LSTM):
            size_in = module.input_size
            for _ in range(module.num_layers):
                flops += 2 * 4 * (size_in + module.hidden_size) * module.hidden_size
                size_in = module.hidden_size
        elif isinstance(module, nn.Linear):
            flops += 2 * module.in_features * module.out_features
    return flops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(size: int, device: torch.device) -> float:
    """GFLOP/s of one fp32 size x size @ size x size torch.mm (ten of them on a GPU)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    repeats = 10 if device.type == "cuda" else 1
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    synchronize(device)
    return repeats * 2 * size**3 / (time.perf_counter() - start) / 1e9


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new memory high-water mark; whether the RSS one could be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM (since the last reset), else ru_maxrss (the process's lifetime peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- the two workers ------------------------------------------------------------------------

class Bench:
    """What both workers share: timing a window of training steps, with its peak memory."""

    device: torch.device

    def step(self) -> int:
        raise NotImplementedError

    def train(self, steps: int) -> dict:
        reset_ok = reset_peak_memory(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        tokens = sum(self.step() for _ in range(steps))
        synchronize(self.device)
        return {"tokens": tokens, "seconds": time.perf_counter() - start, **self.memory(reset_ok)}

    def memory(self, reset_ok: bool) -> dict:
        result = {"peak_mb": peak_rss_mb(), "memory_source": "VmHWM" if reset_ok else "ru_maxrss"}
        if self.device.type == "cuda":
            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return result


class LstmlmBench(Bench):
    """lstmlm's own training step and evaluation, on a Trainer built from the config."""

    def __init__(self, cfg: Config, corpus):
        self.run_dir = tempfile.TemporaryDirectory()  # Trainer wants one; nothing is written
        self.trainer = Trainer(cfg, corpus, Path(self.run_dir.name), quiet=True)
        self.cfg, self.model, self.device = cfg, self.trainer.model, self.trainer.device
        self.valid, self.vocab_size = corpus.valid, len(corpus.vocab)
        self.eval_data = {cfg.valid_batch_size: self.trainer.valid_data}

    def info(self) -> dict:
        return {"forward_flops_per_token": forward_flops_per_token(self.model),
                "vocab_size": self.vocab_size,
                "tokens_per_step": self.cfg.batch_size * self.cfg.bptt,
                "threads": torch.get_num_threads()}

    def step(self) -> int:
        """Trainer.train_step, the training loop's own step (with its end-of-epoch wrap)."""
        t = self.trainer
        t.model.train()
        _, _, tokens = t.train_step()
        if t.state.position >= t.train_data.size(0) - 1:
            t.state.epoch, t.state.position = t.state.epoch + 1, 0
        return tokens

    def evaluate(self, batch_size: int, windows: int) -> dict:
        if batch_size not in self.eval_data:
            self.eval_data[batch_size] = batchify(self.valid, batch_size).to(self.device)
        data = self.eval_data[batch_size][: windows * self.cfg.bptt + 1]
        reset_ok = reset_peak_memory(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        with self.trainer.autocast():  # as the trainer validates
            _, tokens = evaluate(self.model, data, self.cfg.bptt)
        synchronize(self.device)
        return {"tokens": tokens, "seconds": time.perf_counter() - start, **self.memory(reset_ok)}


class PlainLM(nn.Module):
    """nn.Embedding -> nn.LSTM -> nn.Linear, nothing else."""

    def __init__(self, vocab_size: int, sizes: list[int]):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, sizes[0])
        if len(set(sizes[1:])) == 1:  # one stacked nn.LSTM
            self.lstms = nn.ModuleList([nn.LSTM(sizes[0], sizes[1], num_layers=len(sizes) - 1)])
        else:
            self.lstms = nn.ModuleList(nn.LSTM(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.decoder = nn.Linear(sizes[-1], vocab_size)

    def init_hidden(self, batch_size: int):
        weight = self.decoder.weight
        return [(weight.new_zeros(m.num_layers, batch_size, m.hidden_size),
                 weight.new_zeros(m.num_layers, batch_size, m.hidden_size)) for m in self.lstms]

    def forward(self, tokens, hidden):
        x = self.embedding(tokens)
        new_hidden = []
        for lstm, state in zip(self.lstms, hidden):
            x, state = lstm(x, state)
            new_hidden.append(state)
        return self.decoder(x), new_hidden


class PlainBench(Bench):
    """The yardstick: a plain PyTorch training step of the same size, default allocator."""

    def __init__(self, cfg: Config, corpus):
        self.cfg, self.device = cfg, torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.train_data = batchify(corpus.train, cfg.batch_size).to(self.device)
        sizes = [cfg.embedding_size] + [cfg.hidden_size] * (cfg.num_layers - 1) + [cfg.output_size]
        self.vocab_size = len(corpus.vocab)
        self.model = PlainLM(self.vocab_size, sizes).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        self.position, self.hidden = 0, None

    def info(self) -> dict:
        return {"forward_flops_per_token": forward_flops_per_token(self.model)}

    def step(self) -> int:
        cfg, model = self.cfg, self.model
        if self.position == 0 or self.hidden is None:
            self.hidden = model.init_hidden(cfg.batch_size)
        inputs, targets = get_batch(self.train_data, self.position, cfg.bptt)
        hidden = [(h.detach(), c.detach()) for h, c in self.hidden]
        logits, self.hidden = model(inputs, hidden)
        loss = F.cross_entropy(logits.view(-1, self.vocab_size), targets)
        self.optimizer.zero_grad()
        loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        self.optimizer.step()
        loss.item()
        self.position += inputs.size(0)
        if self.position >= self.train_data.size(0) - 1:
            self.position = 0
        return targets.numel()


def worker_main(spec: dict) -> None:
    """Serve requests from the parent: one JSON line in ({"cmd": ..., **kwargs}), one out."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the pipe
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = Config.from_dict(spec["config"])
    corpus = load_corpus(Path(cfg.data), cfg.min_count, cfg.max_vocab)
    bench = (PlainBench if spec["kind"] == "plain" else LstmlmBench)(cfg, corpus)
    if spec["kind"] == "compiled":  # compiled in the warm-up steps, the first call
        bench.trainer.training_loss = torch.compile(bench.trainer.training_loss)
    replies.write(json.dumps(bench.info()) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        replies.write(json.dumps(getattr(bench, request.pop("cmd"))(**request)) + "\n")


class Worker:
    """A worker subprocess, seen from the parent."""

    def __init__(self, name: str, kind: str, cfg: Config, threads: int | None,
                 env: dict | None = None):
        self.name = name
        # Only what differs from the defaults, which a worker importing another version of
        # lstmlm (--against) reads as well, as long as that version knows the keys.
        defaults = Config().to_dict()
        changed = {k: v for k, v in cfg.to_dict().items() if v != defaults[k]}
        spec = {"kind": kind, "config": changed, "threads": threads}
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"throughput: the {self.name} worker exited with status "
                             f"{self.process.wait()} (its error is above)")
        return json.loads(line)

    def call(self, cmd: str, **kwargs) -> dict:
        self.process.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---- the parent ---------------------------------------------------------------------------

def rate(results: list[dict]) -> float:
    """Median tokens/s over windows."""
    return statistics.median(r["tokens"] / r["seconds"] for r in results)


def peak(results: list[dict], device: torch.device) -> float:
    key = "peak_gpu_mb" if device.type == "cuda" else "peak_mb"
    return max(r[key] for r in results)


def windows_for(budget_gflop: float, gflop_per_window: float) -> int:
    return max(1, round(budget_gflop / gflop_per_window))


def eval_windows_for(cfg: Config, batch_size: int, flops: int, windows: int | None,
                     scale: float = 1) -> int:
    """BPTT windows per evaluation measure: `windows`, or about `scale` x EVAL_WINDOW_GFLOP of
    work, rounded up to whole groups of the windows that `evaluate` scores together (up to a
    chunk of the fused loss), as it does throughout a real split."""
    rows = batch_size * cfg.bptt
    per_group = max(1, CHUNK_ROWS // rows)
    windows = windows or windows_for(scale * EVAL_WINDOW_GFLOP, flops * rows / 1e9)
    return -(-windows // per_group) * per_group


def bench_preset(name: str, args, data_dir: Path, overrides: dict) -> dict:
    device = pick_device(args.device)
    cfg = load_preset(name)
    cfg.update({"data": str(data_dir), "device": device.type, **overrides})
    workers = {"lstmlm": Worker("lstmlm", "lstmlm", cfg, args.threads),
               "plain": Worker("plain", "plain", cfg, args.threads),
               "plain_tuned": Worker("plain_tuned", "plain", cfg, args.threads, TUNED_MALLOC)}
    if args.weight_drop_cost and cfg.weight_drop > 0:
        no_drop = Config.from_dict({**cfg.to_dict(), "weight_drop": 0.0})
        workers["no_weight_drop"] = Worker("no_weight_drop", "lstmlm", no_drop, args.threads)
    if args.compile:
        workers["compiled"] = Worker("compiled", "compiled", cfg, args.threads)
    if args.against:
        workers["against"] = Worker("against", "lstmlm", cfg, args.threads,
                                    {"PYTHONPATH": str(args.against)})
    try:
        info = {key: w.read() for key, w in workers.items()}
        flops = info["lstmlm"]["forward_flops_per_token"]
        step_gflop = 3 * flops * info["lstmlm"]["tokens_per_step"] / 1e9
        scale = GPU_WORK_SCALE if device.type == "cuda" else 1
        steps = args.steps or (1 if args.quick else windows_for(scale * TRAIN_WINDOW_GFLOP,
                                                                step_gflop))
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else steps)
        batch_sizes = (cfg.valid_batch_size, 1)
        eval_windows = {bs: 1 if args.quick and not args.eval_windows
                        else eval_windows_for(cfg, bs, flops, args.eval_windows, scale)
                        for bs in batch_sizes}
        log(f"{name}: {flops:,} forward FLOP/token, {steps} step(s) per window, "
            f"{warmup} warm-up step(s), {args.windows} window(s)")

        gemm_gflops(args.gemm_size, device)  # warm-up
        for w in workers.values():
            if warmup:
                w.call("train", steps=warmup)
        train = {key: [] for key in workers}
        gemm = []
        for i in range(args.windows):
            for key, w in workers.items():
                train[key].append(w.call("train", steps=steps))
            gemm.append(gemm_gflops(args.gemm_size, device))
            log(f"{name}: window {i + 1}/{args.windows}: " + ", ".join(
                f"{key} {r[-1]['tokens'] / r[-1]['seconds']:.0f}" for key, r in train.items())
                + f" tokens/s, GEMM {gemm[-1]:.1f} GFLOP/s")

        lstmlm = workers["lstmlm"]
        evals = {bs: [] for bs in batch_sizes}
        for bs in batch_sizes:
            lstmlm.call("evaluate", batch_size=bs, windows=1)  # warm-up
        for _ in range(args.windows):
            for bs in batch_sizes:
                evals[bs].append(lstmlm.call("evaluate", batch_size=bs,
                                             windows=eval_windows[bs]))
            gemm.append(gemm_gflops(args.gemm_size, device))
        log(f"{name}: evaluation done")
    finally:
        for w in workers.values():
            w.close()

    # The best GEMM of the run: other processes on the machine only ever slow a sample down.
    peak_gflops = max(gemm)

    def fraction(tokens_per_s: float, passes: int, flops_per_token: float = flops) -> float:
        return tokens_per_s * passes * flops_per_token / (peak_gflops * 1e9)

    plain_flops = info["plain"]["forward_flops_per_token"]  # a full softmax, always

    train_rate, plain_rate = rate(train["lstmlm"]), rate(train["plain"])
    tuned_rate = rate(train["plain_tuned"])
    eval_rate, eval_b1_rate = rate(evals[cfg.valid_batch_size]), rate(evals[1])
    result = {
        "preset": name, "device": device.type, "threads": info["lstmlm"]["threads"],
        "train_tokens_per_s": train_rate,
        "eval_tokens_per_s": eval_rate, "eval_batch_size": cfg.valid_batch_size,
        "eval_b1_tokens_per_s": eval_b1_rate,
        "peak_train_mb": peak(train["lstmlm"], device),
        "peak_eval_mb": peak(evals[cfg.valid_batch_size] + evals[1], device),
        "memory": "GPU allocated" if device.type == "cuda" else
                  train["lstmlm"][0]["memory_source"] + " (resident set)",
        "gemm_gflops": peak_gflops, "gemm_size": args.gemm_size,
        "forward_flops_per_token": flops, "vocab_size": info["lstmlm"]["vocab_size"],
        "train_fraction_of_peak": fraction(train_rate, 3),
        "gemm_gflops_median": statistics.median(gemm),
        "eval_fraction_of_peak": fraction(eval_rate, 1),
        "eval_b1_fraction_of_peak": fraction(eval_b1_rate, 1),
        "plain_train_tokens_per_s": plain_rate,
        "plain_forward_flops_per_token": plain_flops,
        "plain_train_fraction_of_peak": fraction(plain_rate, 3, plain_flops),
        "plain_peak_train_mb": peak(train["plain"], device),
        "ratio_to_plain": train_rate / plain_rate,
        "plain_tuned_train_tokens_per_s": tuned_rate,
        "plain_tuned_train_fraction_of_peak": fraction(tuned_rate, 3, plain_flops),
        "ratio_to_plain_tuned": train_rate / tuned_rate,
        "windows": args.windows, "steps_per_window": steps, "warmup_steps": warmup,
        "eval_windows": eval_windows[cfg.valid_batch_size], "eval_b1_windows": eval_windows[1],
        "bptt": cfg.bptt,
    }
    if "no_weight_drop" in train:
        no_drop_rate = rate(train["no_weight_drop"])
        result.update({"weight_drop": cfg.weight_drop,
                       "no_weight_drop_train_tokens_per_s": no_drop_rate,
                       "weight_drop_ratio": train_rate / no_drop_rate})
    if "compiled" in train:
        compiled_rate = rate(train["compiled"])
        result.update({"compiled_train_tokens_per_s": compiled_rate,
                       "compiled_ratio": compiled_rate / train_rate})
    if "against" in train:
        against_rate = rate(train["against"])
        result.update({"against": str(args.against), "against_train_tokens_per_s": against_rate,
                       "ratio_to_against": train_rate / against_rate})
    return result


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_table(results: list[dict]) -> None:
    r0 = results[0]
    sizes = {r["eval_batch_size"] for r in results}
    b = sizes.pop() if len(sizes) == 1 else " valid"
    header = ("preset", "train tok/s", f"eval tok/s b{b}", "eval tok/s b1", "peak MB",
              "% GEMM peak", f"eval % peak b{b}", "plain train tok/s", "plain % peak",
              "lstmlm/plain", "tuned plain tok/s", "lstmlm/tuned")
    rows = [(r["preset"], f"{r['train_tokens_per_s']:.0f}", f"{r['eval_tokens_per_s']:.0f}",
             f"{r['eval_b1_tokens_per_s']:.0f}", f"{r['peak_train_mb']:.0f}",
             f"{100 * r['train_fraction_of_peak']:.1f}",
             f"{100 * r['eval_fraction_of_peak']:.1f}", f"{r['plain_train_tokens_per_s']:.0f}",
             f"{100 * r['plain_train_fraction_of_peak']:.1f}", f"{r['ratio_to_plain']:.2f}",
             f"{r['plain_tuned_train_tokens_per_s']:.0f}", f"{r['ratio_to_plain_tuned']:.2f}")
            for r in results]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
    gemm = ", ".join(f"{r['preset']} {r['gemm_gflops']:.1f} "
                     f"(median {r['gemm_gflops_median']:.1f})" for r in results)
    print(f"\nGEMM peak (fp32 {r0['gemm_size']}^3 torch.mm, {r0['device']}, {r0['threads']} "
          f"threads; the best of those timed between the windows), GFLOP/s: {gemm}")
    print(f"peak MB: training phase, {r0['memory']}; medians over {r0['windows']} window(s)")
    costs = [r for r in results if "weight_drop_ratio" in r]
    if costs:
        print("\nweight drop cost (training tokens/s, interleaved):")
        for r in costs:
            print(f"  {r['preset']}: weight_drop={r['weight_drop']:g} "
                  f"{r['train_tokens_per_s']:.0f}, weight_drop=0 "
                  f"{r['no_weight_drop_train_tokens_per_s']:.0f}, "
                  f"ratio {r['weight_drop_ratio']:.3f}")
    for r in results:
        if "compiled_ratio" in r:
            print(f"\n{r['preset']}: training tokens/s {r['train_tokens_per_s']:.0f}, under "
                  f"torch.compile {r['compiled_train_tokens_per_s']:.0f} (interleaved), "
                  f"ratio {r['compiled_ratio']:.3f}")
        if "against" in r:
            print(f"\n{r['preset']}: training tokens/s {r['train_tokens_per_s']:.0f}, with lstmlm "
                  f"from {r['against']} {r['against_train_tokens_per_s']:.0f} (interleaved), "
                  f"ratio {r['ratio_to_against']:.3f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append",
                   help=f"preset(s), repeatable or comma-separated (default: {','.join(PRESETS)})")
    p.add_argument("--data", default="wikitext-2",
                   help="data directory or dataset name (default wikitext-2, under $LSTMLM_DATA)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set batch_size=40 (repeatable)")
    p.add_argument("--windows", type=int,
                   help="timed windows per measure (default 5, 1 with --quick)")
    p.add_argument("--steps", type=int, help="training steps per window (default: by FLOP budget)")
    p.add_argument("--warmup", type=int, help="untimed training steps first (default: one window)")
    p.add_argument("--eval-windows", type=int,
                   help="BPTT windows per evaluation measure (default: by FLOP budget)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every process")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--gemm-size", type=int, help="side of the GEMM peak's matrices (default 4096, "
                                                 "2048 with --quick)")
    p.add_argument("--weight-drop-cost", action="store_true",
                   help="also time training with weight_drop=0, for presets that use weight drop")
    p.add_argument("--compile", action="store_true",
                   help="also time the training step with the loss's forward under "
                        "torch.compile (compiled in the warm-up; needs a C++ compiler)")
    p.add_argument("--against", type=Path, metavar="SRC",
                   help="also time the training step with lstmlm imported from SRC (another "
                        "checkout's src/), interleaved, and give the ratio")
    p.add_argument("--json", action="store_true", help="print one JSON object per preset, "
                                                       "one per line")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 warm-up step, then 1 window of 1 step and 1 evaluation "
                        "window per measure (GEMM 2048)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return args
    args.presets = [name.strip() for item in args.preset or PRESETS
                    for name in item.split(",") if name.strip()]
    if any(n is not None and n < 1 for n in (args.windows, args.steps, args.eval_windows,
                                              args.threads, args.gemm_size)) \
            or (args.warmup or 0) < 0:
        p.error("--windows, --steps, --eval-windows, --threads and --gemm-size must be "
                "positive, --warmup at least 0")
    if args.against:
        if not (args.against / "lstmlm" / "__init__.py").is_file():
            p.error(f"--against {args.against}: no lstmlm package there; give the src/ "
                    f"directory of another checkout of lstmlm")
        args.against = args.against.resolve()
    if args.windows is None:
        args.windows = 1 if args.quick else 5
    if args.gemm_size is None:
        args.gemm_size = 2048 if args.quick else 4096
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._worker:
        return worker_main(json.loads(args._worker))
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(parse_assignment(text) for text in args.set)
    vocabularies = set()
    for name in args.presets:  # every preset's mistakes before the first is measured
        cfg = load_preset(name)
        cfg.update(overrides, source="--set")
        vocabularies.add((cfg.min_count, cfg.max_vocab))
    data_dir = resolve_data(args.data).resolve()
    for min_count, max_vocab in vocabularies:  # tokenize once here; the workers read the cache
        load_corpus(data_dir, min_count, max_vocab)
    results = [bench_preset(name, args, data_dir, overrides) for name in args.presets]
    if args.json:
        for result in results:
            print(json.dumps(result))
    else:
        print_table(results)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a user mistake (unknown preset, bad --set, missing data): one line
        from lstmlm.errors import LstmlmError

        if not isinstance(e, LstmlmError):
            raise
        sys.exit(f"throughput: error: {e}")
