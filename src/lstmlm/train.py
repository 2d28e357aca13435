"""The training loop: SGD/Adam over BPTT windows, validation, checkpoints, budgets and resume.

A run stops when its epochs are done, when `max_steps` or `max_minutes` is reached, or on
SIGINT/SIGTERM. Whatever stops it (except a signal, which only saves and exits), it validates
once more, keeps the best weights, and reports their test perplexity in `results.json`.
Resuming restores weights, optimizer, RNG, hidden state and data position, so the losses that
follow are those of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .allocator import keep_freed_memory
from .config import Config, ConfigError
from .data import Corpus, batchify, get_batch, load_corpus
from .datasets import resolve_data
from .errors import LstmlmError
from .evaluate import evaluate, perplexity
from .model import LSTMLM, Hidden, count_parameters, detach

# Fields a resumed run may change: its budget. Anything else would make it another run.
RESUMABLE_OVERRIDES = ("epochs", "max_steps", "max_minutes", "eval_interval", "checkpoint_minutes")


@dataclass
class TrainState:
    """The trainer's counters; saved as JSON inside state.safetensors."""

    epoch: int = 0  # current epoch (0-based)
    position: int = 0  # row of the batchified training data where the next window starts
    step: int = 0  # optimizer steps done
    seconds: float = 0.0  # wall-clock training time, summed over resumes
    tokens: int = 0  # training tokens processed
    best_valid_loss: float = math.inf  # selects the weights kept in model.safetensors
    plateau_best: float = math.inf  # best of the scheduled validations (for lr decay)
    bad_checks: int = 0  # scheduled validations since plateau_best improved
    validated_step: int = -1  # step of the last validation
    window_loss: float = 0.0  # sum of training losses since the last scheduled validation
    window_steps: int = 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    def __init__(self, cfg: Config, corpus: Corpus, run_dir: Path, quiet: bool = False):
        self.cfg, self.run_dir, self.quiet = cfg, Path(run_dir), quiet
        keep_freed_memory()
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.vocab = corpus.vocab
        self.train_data = batchify(corpus.train, cfg.batch_size).to(self.device)
        self.valid_data = batchify(corpus.valid, cfg.valid_batch_size).to(self.device)
        self.test_data = batchify(corpus.test, cfg.test_batch_size).to(self.device)
        if self.train_data.size(0) - 1 < cfg.bptt:
            raise ConfigError(
                f"bptt {cfg.bptt} is longer than each training stream ({self.train_data.size(0)} "
                f"tokens with batch size {cfg.batch_size}); lower bptt or batch_size")
        self.model = LSTMLM(cfg, len(self.vocab)).to(self.device)
        self.optimizer = make_optimizer(cfg, self.model)
        self.state = TrainState()
        self.hidden: Hidden | None = None
        self.stop_signal: str | None = None

    # ---- state on disk --------------------------------------------------------------------

    def save_state(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for i, param_state in self.optimizer.state_dict()["state"].items():
            for key, value in param_state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{i}.{key}"] = value
        if self.hidden is not None:
            for i, (h, c) in enumerate(self.hidden):
                tensors[f"hidden.{i}.h"], tensors[f"hidden.{i}.c"] = h, c
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"trainer": json.dumps(dataclasses.asdict(self.state)),
                "param_groups": json.dumps(self.optimizer.state_dict()["param_groups"])}
        self._write(lambda: ckpt.write_tensors(self.run_dir / ckpt.STATE, tensors, meta))

    def load_state(self) -> None:
        path = self.run_dir / ckpt.STATE
        tensors, meta = ckpt.read_tensors(path)
        try:
            self.state = TrainState(**json.loads(meta["trainer"]))
            param_groups = json.loads(meta["param_groups"])
        except (KeyError, TypeError, ValueError):
            raise ckpt.RunDirError(f"{path}: damaged trainer state; cannot resume") from None
        ckpt.load_weights(self.model, {k[6:]: v.to(self.device) for k, v in tensors.items()
                                       if k.startswith("model.")}, path)
        optim_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                optim_state.setdefault(int(i), {})[name] = value.to(self.device)
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": param_groups})
        layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("hidden.")})
        self.hidden = [(tensors[f"hidden.{i}.h"].to(self.device),
                        tensors[f"hidden.{i}.c"].to(self.device)) for i in layers] or None
        torch.set_rng_state(tensors["rng.cpu"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)

    def _write(self, save) -> None:
        try:
            save()
        except OSError as e:
            raise LstmlmError(
                f"cannot write to {self.run_dir} ({e.strerror}); the previous checkpoint is "
                f"intact: free space or fix permissions, then `lstmlm train --resume {self.run_dir}`"
            ) from None

    def log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    # ---- validation -----------------------------------------------------------------------

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def validate(self, train_loss: float, tokens_per_s: float, schedule: bool = True) -> float:
        """Validate, keep the best weights, log a metrics line; with `schedule`, decay the lr
        on a plateau (the extra validation at a stop does not, so resumed runs match)."""
        cfg, st = self.cfg, self.state
        valid_loss, _ = evaluate(self.model, self.valid_data, cfg.bptt)
        self.model.train()
        improved = valid_loss < st.best_valid_loss
        if improved:
            st.best_valid_loss = valid_loss
            self._write(lambda: ckpt.write_tensors(self.run_dir / ckpt.WEIGHTS,
                                                   self.model.state_dict()))
        if schedule:
            self.decay_on_plateau(valid_loss)
        st.validated_step = st.step
        record = {"epoch": self.epochs_done(), "step": st.step, "seconds": round(st.seconds, 2),
                  "tokens_per_s": round(tokens_per_s, 1), "train_loss": train_loss,
                  "train_ppl": perplexity(train_loss), "valid_loss": valid_loss,
                  "valid_ppl": perplexity(valid_loss), "lr": self.lr, "best": improved}
        self._write(lambda: _append_line(self.run_dir / ckpt.METRICS, json.dumps(record)))
        self.log(f"step {st.step} | epoch {st.epoch + 1} | valid loss {valid_loss:.4f} | "
                 f"valid ppl {perplexity(valid_loss):.2f}{' (best)' if improved else ''} | "
                 f"lr {self.lr:.3g}")
        return valid_loss

    def epochs_done(self) -> float:
        return round(self.state.epoch + self.state.position / (self.train_data.size(0) - 1), 3)

    def decay_on_plateau(self, valid_loss: float) -> None:
        cfg, st = self.cfg, self.state
        if valid_loss < st.plateau_best:
            st.plateau_best, st.bad_checks = valid_loss, 0
            return
        st.bad_checks += 1
        if st.bad_checks > cfg.lr_patience and cfg.lr_decay > 1:
            new_lr = max(self.lr / cfg.lr_decay, cfg.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = new_lr
            st.bad_checks = 0

    # ---- the loop -------------------------------------------------------------------------

    def stop_reason(self, started: float) -> str | None:
        cfg, st = self.cfg, self.state
        if self.stop_signal:
            return "interrupted"
        if st.epoch >= cfg.epochs:
            return "epochs"
        if cfg.max_steps and st.step >= cfg.max_steps:
            return "max_steps"
        if cfg.max_minutes and st.seconds + time.monotonic() - started >= cfg.max_minutes * 60:
            return "max_minutes"
        return None

    def train(self) -> dict:
        cfg, st, model = self.cfg, self.state, self.model
        model.train()
        started = time.monotonic()
        last_save = started
        window_tokens, window_time = 0, 0.0
        rows = self.train_data.size(0) - 1
        bar = tqdm(total=rows, initial=st.position, unit="row", dynamic_ncols=True,
                   disable=None if not self.quiet else True, leave=False, file=sys.stderr)
        bar.set_description(f"epoch {st.epoch + 1}")
        while (reason := self.stop_reason(started)) is None:
            if st.position == 0 or self.hidden is None:
                self.hidden = model.init_hidden(cfg.batch_size)
            t0 = time.monotonic()
            inputs, targets = get_batch(self.train_data, st.position, cfg.bptt)
            loss, hidden = model.loss(inputs, targets, detach(self.hidden))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            self.optimizer.step()
            self.hidden = detach(hidden)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise LstmlmError(
                    f"training loss became {loss_value} at step {st.step + 1}; lower the "
                    f"learning rate (--lr) and start again, or resume from the last checkpoint")
            dt = time.monotonic() - t0
            st.step += 1
            st.position += inputs.size(0)
            st.tokens += targets.numel()
            st.window_loss, st.window_steps = st.window_loss + loss_value, st.window_steps + 1
            window_tokens, window_time = window_tokens + targets.numel(), window_time + dt
            bar.update(inputs.size(0))
            bar.set_postfix(loss=f"{loss_value:.3f}", ppl=f"{perplexity(loss_value):.1f}",
                            lr=f"{self.lr:.3g}", tok_s=f"{window_tokens / window_time:.0f}",
                            refresh=False)
            end_of_epoch = st.position >= rows
            if end_of_epoch:
                st.epoch, st.position = st.epoch + 1, 0
                bar.reset()
                bar.set_description(f"epoch {st.epoch + 1}")
            now = time.monotonic()
            st.seconds += now - started
            started = now
            due = st.step % cfg.eval_interval == 0 if cfg.eval_interval else end_of_epoch
            if due:
                self.validate(st.window_loss / st.window_steps, window_tokens / window_time)
                st.window_loss, st.window_steps = 0.0, 0
                window_tokens, window_time = 0, 0.0
                self.save_state()
                last_save = time.monotonic()
            elif cfg.checkpoint_minutes and now - last_save >= cfg.checkpoint_minutes * 60:
                self.save_state()
                last_save = time.monotonic()
        bar.close()
        st.seconds += time.monotonic() - started
        if reason == "interrupted":
            self.save_state()
            self.log(f"{self.stop_signal} received: saved step {st.step} to {self.run_dir}; "
                     f"continue with `lstmlm train --resume {self.run_dir}`")
            return {"stop_reason": reason, "steps": st.step}
        if st.validated_step != st.step:
            self.validate(st.window_loss / max(st.window_steps, 1),
                          window_tokens / window_time if window_time else 0.0, schedule=False)
        self.save_state()
        return self.finish(reason)

    def finish(self, reason: str) -> dict:
        """Test the best weights and write results.json."""
        cfg, st = self.cfg, self.state
        best = LSTMLM(cfg, len(self.vocab)).to(self.device)
        path = self.run_dir / ckpt.WEIGHTS
        ckpt.load_weights(best, {k: v.to(self.device) for k, v in ckpt.read_tensors(path)[0].items()},
                          path)
        test_loss, test_tokens = evaluate(best, self.test_data, cfg.bptt)
        results = {
            "stop_reason": reason, "epochs": self.epochs_done(),
            "steps": st.step, "train_minutes": round(st.seconds / 60, 2),
            "train_tokens": st.tokens,
            "train_tokens_per_s": round(st.tokens / st.seconds, 1) if st.seconds else 0.0,
            "parameters": count_parameters(self.model),
            "best_valid_loss": st.best_valid_loss, "best_valid_ppl": perplexity(st.best_valid_loss),
            "test_loss": test_loss, "test_ppl": perplexity(test_loss), "test_tokens": test_tokens,
        }
        self._write(lambda: ckpt.write_json(self.run_dir / ckpt.RESULTS, results))
        self.log(f"stopped ({reason}) after {st.step} steps, {results['train_minutes']} min | "
                 f"best valid ppl {results['best_valid_ppl']:.2f} | "
                 f"test ppl {results['test_ppl']:.2f} | {self.run_dir}")
        return results


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


class _StopOnSignal:
    """SIGINT/SIGTERM ask the trainer to save and stop after the current step; a second
    SIGINT interrupts at once (the last saved checkpoint is still intact)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.trainer.stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.trainer.stop_signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def run_training(cfg: Config | None = None, out: Path | None = None, resume: Path | None = None,
                 overrides: dict | None = None, quiet: bool = False) -> dict:
    """Start a new run in `out` with `cfg`, or continue the run in `resume`.

    On resume only the budget fields (RESUMABLE_OVERRIDES) may be overridden.
    """
    overrides = overrides or {}
    if resume is not None:
        run_dir = Path(resume)
        cfg, vocab_size = ckpt.read_run_config(run_dir)
        changed = sorted(k for k, v in overrides.items() if getattr(cfg, k) != v)
        frozen = [k for k in changed if k not in RESUMABLE_OVERRIDES]
        if frozen:
            raise ConfigError(
                f"cannot change {', '.join(frozen)} when resuming; only the budget "
                f"({', '.join(RESUMABLE_OVERRIDES)}) can change")
        cfg.update(overrides)
        if not (run_dir / ckpt.STATE).is_file():
            raise ckpt.RunDirError(f"{run_dir} has no {ckpt.STATE}: nothing to resume")
    else:
        cfg.update(overrides)
        run_dir = Path(out)
    corpus = load_corpus(resolve_data(cfg.data))
    if resume is not None:
        ckpt.read_vocab(run_dir, vocab_size)  # the corpus must still be the one trained on
        if vocab_size != len(corpus.vocab):
            raise ckpt.RunDirError(
                f"{run_dir} was trained on a vocabulary of {vocab_size} words, but {cfg.data} "
                f"gives {len(corpus.vocab)}; resume with the original data")
    trainer = Trainer(cfg, corpus, run_dir, quiet=quiet)
    if resume is not None:
        trainer.load_state()
        ckpt.write_config(run_dir, cfg, vocab_size)
    else:
        ckpt.create_run_dir(run_dir, cfg, corpus.vocab)
    trainer.log(f"{cfg.data}: {corpus.summary()}")
    trainer.log(f"model: {count_parameters(trainer.model):,} parameters | run directory {run_dir}")
    with _StopOnSignal(trainer):
        return trainer.train()
