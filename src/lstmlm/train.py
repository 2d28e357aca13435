"""The training loop: SGD/Adam over BPTT windows, validation, checkpoints, budgets and resume.

A run stops when its epochs are done, when `max_steps` or `max_minutes` is reached, after
`stop_patience` validations in a row without a new best, or on SIGINT/SIGTERM. Whatever stops
it (except a signal, which only saves and exits), it validates once more, keeps the best
weights, and reports their test perplexity in `results.json`.
Resuming restores weights, optimizer, RNG, hidden state and data position, so the losses that
follow are those of an uninterrupted run with the same seed.

A non-finite training loss, gradient norm, validation loss or weight is caught before it is
applied or saved: the trainer rolls back to its last checkpoint (or to its starting state),
multiplies the lr by `nan_lr_factor` and goes on, at most `max_nan_retries` times per run.
No checkpoint ever holds a non-finite weight. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .allocator import keep_freed_memory
from .config import Config, ConfigError
from .data import Corpus, batchify, get_batch, load_corpus
from .datasets import recorded_data, resolve_data
from .errors import LstmlmError
from .evaluate import evaluate, perplexity
from .fileio import atomic_write
from .model import LSTMLM, Hidden, count_parameters, detach, pick_device
from .optim import WeightAverage, clip_grad_norm, make_optimizer, nonmono_triggered
from .transfer import transfer_weights

# Fields a resumed run may change: its budget, where it runs, and where its data now is (the
# vocabulary and the number of training tokens must match). Anything else makes another run.
RESUMABLE_OVERRIDES = ("epochs", "max_steps", "max_minutes", "stop_patience", "eval_interval",
                       "eval_minutes", "checkpoint_minutes", "checkpoint_steps", "max_nan_retries",
                       "device", "precision", "data")


class DivergedError(LstmlmError):
    """Training kept producing non-finite numbers after every rollback it was allowed."""


class _NonFinite(Exception):
    """Inside the loop: a loss, gradient norm or weight is inf/nan; the trainer rolls back."""


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
    checks_since_best: int = 0  # scheduled validations since best_valid_loss improved
    validated_step: int = -1  # step of the last validation
    validated_seconds: float = 0.0  # training time at the last scheduled validation
    window_loss: float = 0.0  # sum of training losses since the last scheduled validation
    window_steps: int = 0
    valid_history: list = dataclasses.field(default_factory=list)  # scheduled checks' losses
    averaging_since: int = -1  # step at which weight averaging began (-1: not yet)
    converged: bool = False  # fine-tuning: the non-monotone trigger fired
    nan_rollbacks: int = 0  # rollbacks after non-finite numbers (each lowered the lr)
    corpus_tokens: int = 0  # tokens in the training split (0: not recorded, an older run)


def sample_seq_len(cfg: Config) -> int:
    """AWD-LSTM's variable BPTT: bptt (or bptt/2 with probability 0.05), jittered by N(0, 5),
    at least 5 and at most bptt + bptt_max_extra. Uses torch's RNG, so resume replays it."""
    if not cfg.variable_bptt:
        return cfg.bptt
    base = cfg.bptt if torch.rand(()).item() < 0.95 else cfg.bptt / 2
    seq_len = max(5, int(torch.normal(float(base), 5.0, ()).item()))
    return min(seq_len, cfg.bptt + cfg.bptt_max_extra)


class Trainer:
    def __init__(self, cfg: Config, corpus: Corpus, run_dir: Path, quiet: bool = False):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        keep_freed_memory()
        self.group, self.device = distributed.join(pick_device(cfg.device))
        self.quiet = quiet or not self.group.is_main
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device (CPU LSTM kernels have no "
                              "fp16); on a CPU use --precision bf16 or fp32")
        distributed.check_divisible(cfg.batch_size, self.group)
        torch.manual_seed(cfg.seed)
        self.vocab = corpus.vocab

        def streams(split: str, setting: str) -> torch.Tensor:
            tokens = batchify(getattr(corpus, split), getattr(cfg, setting),
                              f"the {split} split", setting)
            return distributed.columns(tokens, self.group).to(self.device)

        self.train_data = streams("train", "batch_size")
        self.valid_data = streams("valid", "valid_batch_size")
        self.test_data = streams("test", "test_batch_size")
        if self.train_data.size(0) - 1 < cfg.bptt:
            raise ConfigError(
                f"bptt {cfg.bptt} is longer than each training stream ({self.train_data.size(0)} "
                f"tokens with batch size {cfg.batch_size}); lower bptt or batch_size")
        self.model = LSTMLM(cfg, len(self.vocab)).to(self.device)
        self.training_loss = distributed.wrap(self.model, self.group, self.device)
        if self.group.active:
            self.model.stream_generator = torch.Generator(self.device)
        self.optimizer = make_optimizer(cfg, self.model)
        # fp16 needs its loss scaled so small gradients survive; disabled, it changes nothing.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.corpus_tokens = corpus.train.numel()
        self.state = TrainState(corpus_tokens=self.corpus_tokens)
        self.average: WeightAverage | None = None  # from NT-ASGD's switch or average_from
        self.hidden: Hidden | None = None
        # A signal's name is pending until the next tick, which makes it the stop signal (on
        # every rank at once under DDP: the ranks must stop after the same step).
        self.pending_signal: str | None = None
        self.stop_signal: str | None = None
        self.has_checkpoint = False  # whether state.safetensors holds this run's state
        # Training time: `clock` is when state.seconds was last advanced, `saved_at` the
        # state.seconds of the last checkpoint; tokens/s is measured over a window of steps.
        self.clock, self.saved_at = time.monotonic(), 0.0
        self.window_tokens, self.window_time = 0, 0.0
        self.initial: tuple[dict, dict] | None = None  # rollback target before the first save

    def start_averaging(self) -> None:
        self.average = WeightAverage(self.model)
        self.state.averaging_since = self.state.step

    def best_weights(self):
        """Context in which the model holds the weights to validate and save: the average
        once averaging has begun (NT-ASGD, fine-tuning, average_from), else the current ones."""
        return self.average.swapped_in() if self.average else contextlib.nullcontext()

    # ---- state on disk --------------------------------------------------------------------

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Everything a resume needs, as the tensors and metadata of state.safetensors."""
        tensors = {f"model.{k}": v for k, v in ckpt.model_tensors(self.model).items()}
        if self.average:
            tensors.update({f"avg.{k}": v for k, v in self.average.mean.items()})
        for i, param_state in self.optimizer.state_dict()["state"].items():
            for key, value in param_state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{i}.{key}"] = value
        if self.hidden is not None:  # all ranks' streams, so any number of ranks can resume
            for i, (h, c) in enumerate(self.hidden):
                tensors[f"hidden.{i}.h"] = distributed.gather_columns(h, self.group)
                tensors[f"hidden.{i}.c"] = distributed.gather_columns(c, self.group)
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"trainer": json.dumps(dataclasses.asdict(self.state)),
                "param_groups": json.dumps(self.optimizer.state_dict()["param_groups"]),
                "avg_count": str(self.average.count if self.average else 0),
                "scaler": json.dumps(self.scaler.state_dict())}
        return tensors, meta

    def check_finite(self) -> None:
        """Raise _NonFinite if a weight or the hidden state is inf/nan (never saved)."""
        tensors = [p.detach() for p in self.model.parameters()]
        tensors += [t for pair in self.hidden or [] for t in pair]
        bad = not torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        if distributed.reduce([float(bad)], self.group, "max", self.device)[0]:  # any rank's
            raise _NonFinite("a weight or the hidden state became inf/nan")

    def save_state(self) -> None:
        self.check_finite()
        tensors, meta = self.state_tensors()
        self._write(lambda: ckpt.write_tensors(self.run_dir / ckpt.STATE, tensors, meta))
        self.has_checkpoint = True
        self.saved_at = self.state.seconds

    def load_state(self) -> None:
        path = self.run_dir / ckpt.STATE
        self.restore(*ckpt.read_tensors(path), path)
        self.has_checkpoint = True

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict, source) -> None:
        """Set weights, optimizer, average, hidden state, RNG and counters from `tensors` and
        `meta` (those of state.safetensors, or the in-memory starting state)."""
        try:
            self.state = TrainState(**json.loads(meta["trainer"]))
            param_groups = json.loads(meta["param_groups"])
        except (KeyError, TypeError, ValueError):
            raise ckpt.RunDirError(f"{source}: damaged trainer state; cannot resume") from None
        if self.state.corpus_tokens not in (0, self.corpus_tokens):
            raise ckpt.RunDirError(
                f"{self.cfg.data} has {self.corpus_tokens:,} training tokens, but the run was "
                f"trained on {self.state.corpus_tokens:,}: not the same data; pass the run's "
                "original data with --data")
        self.state.corpus_tokens = self.corpus_tokens  # recorded from now on in older runs too
        ckpt.load_weights(self.model, {k[6:]: v.to(self.device) for k, v in tensors.items()
                                       if k.startswith("model.")}, source)
        optim_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                optim_state.setdefault(int(i), {})[name] = value.to(self.device, copy=True)
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": param_groups})
        layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("hidden.")})
        self.hidden = [tuple(distributed.columns(tensors[f"hidden.{i}.{hc}"], self.group)
                             .to(self.device, copy=True) for hc in "hc")
                       for i in layers] or None
        self.average = None
        if self.state.averaging_since >= 0:
            self.average = WeightAverage(self.model)
            for k in self.average.mean:
                self.average.mean[k].copy_(tensors[f"avg.{k}"])
            self.average.count = int(meta["avg_count"])
        if self.scaler.is_enabled() and json.loads(meta.get("scaler", "{}")):
            self.scaler.load_state_dict(json.loads(meta["scaler"]))
        torch.set_rng_state(tensors["rng.cpu"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)

    def save_best_weights(self) -> None:
        """The model's weights as the run's best (model.safetensors)."""
        self._write(lambda: ckpt.write_tensors(self.run_dir / ckpt.WEIGHTS,
                                               ckpt.model_tensors(self.model)))

    def _write(self, save) -> None:
        if not self.group.is_main:  # one rank writes; the others hold the same numbers
            return
        try:
            save()
        except OSError as e:
            raise LstmlmError(
                f"cannot write to {self.run_dir} ({e.strerror or e}); the previous checkpoint is "
                f"intact: free space or fix permissions, then `lstmlm train --resume {self.run_dir}`"
            ) from None

    def log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    def trim_metrics(self) -> None:
        """Drop from metrics.jsonl the validations after the current step (a resumed or rolled
        back run makes them again) and any line a kill cut short."""
        path = self.run_dir / ckpt.METRICS
        if not path.is_file():
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        keep = []
        for line in text.splitlines():
            try:
                if json.loads(line)["step"] <= self.state.step:
                    keep.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
        if "".join(keep) != text:
            self._write(lambda: atomic_write(path, "".join(keep).encode("utf-8")))

    # ---- non-finite numbers -----------------------------------------------------------------

    def roll_back(self, problem: str) -> None:
        """Return to the last checkpoint (or the starting state) with the lr times
        nan_lr_factor; a DivergedError once max_nan_retries rollbacks have been used."""
        cfg, failed, lr = self.cfg, self.state, self.base_lr
        rollbacks = failed.nan_rollbacks + 1
        if rollbacks > cfg.max_nan_retries:
            kept = (f"{self.run_dir} keeps the last good checkpoint" if self.has_checkpoint else
                    f"no checkpoint was saved in {self.run_dir} before that")
            raise DivergedError(
                f"training diverged: {problem} after step {failed.step}, with "
                f"{rollbacks - 1} rollback(s) to the last good state already used (lr now "
                f"{lr:.3g}); {kept}: start a new run (another --out) with a lower --lr or a "
                f"--clip, or resume with a larger --max-nan-retries")
        if self.has_checkpoint:
            self.load_state()
        else:
            self.restore(*self.initial, "the starting state")
        self.model.train()
        st = self.state
        st.nan_rollbacks, st.seconds = rollbacks, failed.seconds
        self.base_lr = lr * cfg.nan_lr_factor
        self.trim_metrics()
        self.log(f"step {failed.step}: {problem}; rolled back to step {st.step} with the lr "
                 f"lowered to {self.base_lr:.3g} (rollback {rollbacks} of at most "
                 f"{cfg.max_nan_retries})")

    # ---- validation -----------------------------------------------------------------------

    @property
    def base_lr(self) -> float:
        """The lr the schedule starts from, held in the optimizer between steps: plateau decay
        and rollbacks lower it; step_optimizer sets the scheduled lr for one step only."""
        return self.optimizer.param_groups[0]["lr"]

    @base_lr.setter
    def base_lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def validate(self, train_loss: float, tokens_per_s: float, schedule: bool = True) -> float:
        """Validate, keep the best weights, log a metrics line; with `schedule`, decay the lr
        on a plateau (the extra validation at a stop does not, so resumed runs match)."""
        st = self.state
        with self.best_weights():
            valid_loss, _ = self.evaluate(self.model, self.valid_data, "valid")
            improved = math.isfinite(valid_loss) and valid_loss < st.best_valid_loss
            if improved:
                st.best_valid_loss = valid_loss
                self.save_best_weights()
        self.model.train()
        if not math.isfinite(valid_loss):
            raise _NonFinite(f"the validation loss became {valid_loss}")
        if schedule:
            st.checks_since_best = 0 if improved else st.checks_since_best + 1
            self.schedule(valid_loss)
        st.validated_step = st.step
        lr = self.scheduled_lr()
        record = {"epoch": self.epochs_done(), "step": st.step, "seconds": round(st.seconds, 2),
                  "tokens_per_s": round(tokens_per_s, 1), "train_loss": train_loss,
                  "train_ppl": perplexity(train_loss), "valid_loss": valid_loss,
                  "valid_ppl": perplexity(valid_loss), "lr": lr, "best": improved}
        self._write(lambda: _append_line(self.run_dir / ckpt.METRICS, json.dumps(record)))
        self.log(f"step {st.step} | epochs {self.epochs_done():.2f} | valid loss "
                 f"{valid_loss:.4f} | valid ppl {perplexity(valid_loss):.2f}"
                 f"{' (best)' if improved else ''} | lr {lr:.3g}")
        return valid_loss

    def autocast(self):
        """Mixed precision for the forward pass, per `precision` (a no-op at fp32)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def evaluate(self, model: LSTMLM, data: torch.Tensor, split: str) -> tuple[float, int]:
        """Mean loss and tokens on a split, with a progress bar unless quiet; under DDP each
        rank scores its streams and the sums are reduced, which gives the single-process
        numbers."""
        progress = "" if self.quiet else split
        with self.autocast():  # under DDP a rank may hold none of a small split's streams
            loss, tokens = (evaluate(model, data, self.cfg.bptt, progress) if data.size(1)
                            else (0.0, 0))
        if not self.group.active:
            return loss, tokens
        total, tokens = distributed.reduce([loss * tokens, tokens], self.group, device=self.device)
        return total / tokens, int(tokens)

    def epochs_done(self) -> float:
        return round(self.state.epoch + self.state.position / (self.train_data.size(0) - 1), 3)

    def schedule(self, valid_loss: float) -> None:
        """What a scheduled validation decides: NT-ASGD's switch, fine-tuning's stop, lr decay."""
        cfg, st = self.cfg, self.state
        if nonmono_triggered(st.valid_history, valid_loss, cfg.nonmono):
            if cfg.finetune:
                st.converged = True
            elif cfg.ntasgd and self.average is None:
                self.start_averaging()
                self.log(f"step {st.step}: validation stopped improving, switching to averaged SGD")
        st.valid_history.append(valid_loss)
        if cfg.lr_schedule == "plateau":
            self.decay_on_plateau(valid_loss)

    def decay_on_plateau(self, valid_loss: float) -> None:
        cfg, st = self.cfg, self.state
        if valid_loss < st.plateau_best:
            st.plateau_best, st.bad_checks = valid_loss, 0
            return
        st.bad_checks += 1
        if st.bad_checks > cfg.lr_patience and cfg.lr_decay > 1:
            # Never below min_lr, and never up to it (an lr below it stays where it is).
            self.base_lr = max(self.base_lr / cfg.lr_decay, min(cfg.min_lr, self.base_lr))
            st.bad_checks = 0

    # ---- the loop -------------------------------------------------------------------------

    def progress(self) -> float:
        """Fraction of the run done: the furthest along of its epochs, steps and minutes."""
        cfg, st = self.cfg, self.state
        done = [self.epochs_done() / cfg.epochs]
        if cfg.max_steps:
            done.append(st.step / cfg.max_steps)
        if cfg.max_minutes:
            done.append(st.seconds / (cfg.max_minutes * 60))
        return min(1.0, max(done))

    def scheduled_lr(self) -> float:
        """The lr of the next step: under the cosine schedule, the base lr annealed toward
        min_lr by the run's progress, so a fixed budget ends at a low lr wherever it stops."""
        if self.cfg.lr_schedule != "cosine":
            return self.base_lr
        low = min(self.cfg.min_lr, self.base_lr)
        return low + (self.base_lr - low) * 0.5 * (1 + math.cos(math.pi * self.progress()))

    def step_optimizer(self, seq_len: int) -> None:
        """One optimizer step at the scheduled lr; under variable BPTT the lr is scaled by
        seq_len / bptt for it."""
        base_lr, step_lr = self.base_lr, self.scheduled_lr()
        if self.cfg.variable_bptt:
            step_lr *= seq_len / self.cfg.bptt
        for group in self.optimizer.param_groups:
            group["lr"] = step_lr
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
        self.scaler.update()
        self.base_lr = base_lr
        if self.average:
            self.average.update()

    def stop_reason(self) -> str | None:
        cfg, st = self.cfg, self.state
        if self.stop_signal:
            return "interrupted"
        if st.converged:
            return "converged"
        if cfg.stop_patience and st.checks_since_best >= cfg.stop_patience:
            return "no_improvement"
        if st.epoch >= cfg.epochs:
            return "epochs"
        if cfg.max_steps and st.step >= cfg.max_steps:
            return "max_steps"
        if cfg.max_minutes and st.seconds >= cfg.max_minutes * 60:
            return "max_minutes"
        return None

    def train_step(self) -> tuple[float, int, int]:
        """One optimizer step on the next window: (loss, rows, tokens). Raises _NonFinite
        before the weights change when the loss or the gradient norm is inf/nan."""
        cfg, st, model = self.cfg, self.state, self.model
        if st.position == 0 or self.hidden is None:
            self.hidden = model.init_hidden(self.train_data.size(1))
        inputs, targets = get_batch(self.train_data, st.position, sample_seq_len(cfg))
        if model.stream_generator is not None:
            model.stream_generator.manual_seed(
                distributed.mask_seed(cfg.seed, self.group.rank, st.step))
        with self.autocast():
            loss, penalty, hidden = self.training_loss(inputs, targets, detach(self.hidden))
        self.optimizer.zero_grad(set_to_none=True)
        total = loss.float() + penalty
        self.scaler.scale(total).backward()
        loss_value, total_value = distributed.reduce(
            torch.stack([loss.detach(), total.detach()]).tolist(), self.group, "mean", self.device)
        if not math.isfinite(total_value):
            raise _NonFinite(f"the training loss became {total_value}")
        if cfg.clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = clip_grad_norm(model.parameters(), cfg.clip)
            # Under fp16 an overflow only means the loss scale was too high: the scaler skips
            # the step and lowers it. Anywhere else it is a real problem: roll back.
            if not math.isfinite(norm) and not self.scaler.is_enabled():
                raise _NonFinite(f"the gradient norm became {norm}")
        self.step_optimizer(inputs.size(0))
        self.hidden = detach(hidden)
        st.step += 1
        st.position += inputs.size(0)
        tokens = targets.numel() * self.group.world_size
        st.tokens += tokens
        st.window_loss, st.window_steps = st.window_loss + loss_value, st.window_steps + 1
        return loss_value, inputs.size(0), tokens

    def checkpoint_due(self) -> bool:
        """Whether a periodic checkpoint is due (every checkpoint_steps, checkpoint_minutes)."""
        cfg, since_save = self.cfg, self.state.seconds - self.saved_at
        return bool(cfg.checkpoint_steps and self.state.step % cfg.checkpoint_steps == 0
                    or cfg.checkpoint_minutes and since_save >= cfg.checkpoint_minutes * 60)

    def tick(self) -> None:
        """Add the wall-clock time since the last tick to the run's training time, and turn a
        pending signal into the stop signal. Under DDP the ranks take the slowest clock and
        any rank's pending signal, so they stop together: a signal that arrives during the
        reduction waits for the next tick on its rank, as it does on the others."""
        now = time.monotonic()
        self.state.seconds += now - self.clock
        self.clock = now
        pending, stopping = self.pending_signal, self.pending_signal is not None
        if self.group.active:
            self.state.seconds, stopping = distributed.reduce(
                [self.state.seconds, float(stopping)], self.group, "max", self.device)
        if stopping and self.stop_signal is None:
            self.stop_signal = pending or "another rank's stop signal"

    @property
    def tokens_per_s(self) -> float:
        """Training speed since the last validation (step time only)."""
        return self.window_tokens / self.window_time if self.window_time else 0.0

    def advance(self, bar: tqdm) -> None:
        """One training step, then the validation and checkpoint it makes due."""
        cfg, st = self.cfg, self.state
        t0 = time.monotonic()
        loss_value, rows, tokens = self.train_step()
        self.window_tokens += tokens
        self.window_time += time.monotonic() - t0
        bar.update(rows)
        bar.set_postfix(loss=f"{loss_value:.3f}", ppl=f"{perplexity(loss_value):.1f}",
                        lr=f"{self.scheduled_lr():.3g}", tok_s=f"{self.tokens_per_s:.0f}",
                        refresh=False)
        end_of_epoch = st.position >= self.train_data.size(0) - 1
        if end_of_epoch:
            st.epoch, st.position = st.epoch + 1, 0
            bar.reset()
            bar.set_description(f"epoch {st.epoch + 1}")
        self.tick()
        if cfg.average_from and self.average is None and self.progress() >= cfg.average_from:
            self.start_averaging()
            self.log(f"step {st.step}: {cfg.average_from:.0%} of the run done, averaging the "
                     f"weights from here on")
        due = st.step % cfg.eval_interval == 0 if cfg.eval_interval else end_of_epoch
        due = due or bool(cfg.eval_minutes and
                          st.seconds - st.validated_seconds >= cfg.eval_minutes * 60)
        if due:
            st.validated_seconds = st.seconds
            self.validate(st.window_loss / st.window_steps, self.tokens_per_s)
            st.window_loss, st.window_steps = 0.0, 0
            self.window_tokens, self.window_time = 0, 0.0
        if due or self.checkpoint_due():
            self.save_state()

    def wrap_up(self, reason: str) -> None:
        """At a stop: validate once more unless just done (not after a signal), then save."""
        st = self.state
        if reason != "interrupted" and st.validated_step != st.step:
            self.validate(st.window_loss / max(st.window_steps, 1), self.tokens_per_s,
                          schedule=False)
        self.save_state()

    def train(self) -> dict:
        self.model.train()
        if not self.has_checkpoint:  # what a rollback before the first save returns to
            tensors, meta = self.state_tensors()
            self.initial = ({k: v.to("cpu", copy=True) for k, v in tensors.items()}, meta)
        self.clock, self.saved_at = time.monotonic(), self.state.seconds
        self.window_tokens, self.window_time = 0, 0.0
        with tqdm(total=self.train_data.size(0) - 1, initial=self.state.position, unit="row",
                  dynamic_ncols=True, disable=True if self.quiet else None, leave=False,
                  file=sys.stderr) as bar:
            bar.set_description(f"epoch {self.state.epoch + 1}")
            while True:
                try:
                    self.tick()
                    if (reason := self.stop_reason()) is not None:
                        self.wrap_up(reason)
                        break
                    self.advance(bar)
                except _NonFinite as e:
                    self.roll_back(str(e))  # replaces self.state
                    self.tick()
                    self.window_tokens, self.window_time = 0, 0.0
                    bar.reset()
                    bar.update(self.state.position)
                    bar.set_description(f"epoch {self.state.epoch + 1}")
        if reason == "interrupted":
            self.log(f"{self.stop_signal} received: saved step {self.state.step} to "
                     f"{self.run_dir}; continue with `lstmlm train --resume {self.run_dir}`")
            return {"stop_reason": reason, "steps": self.state.step}
        return self.finish(reason)

    def load_best(self) -> LSTMLM:
        best = LSTMLM(self.cfg, len(self.vocab)).to(self.device)
        path = self.run_dir / ckpt.WEIGHTS
        tensors = ckpt.read_tensors(path)[0]
        ckpt.load_weights(best, {k: v.to(self.device) for k, v in tensors.items()}, path)
        return best

    def finish(self, reason: str) -> dict:
        """Test the best weights and write results.json."""
        st = self.state
        distributed.barrier(self.group)  # rank 0's last write of the best weights is done
        test_loss, test_tokens = self.evaluate(self.load_best(), self.test_data, "test")
        results = {
            "stop_reason": reason, "epochs": self.epochs_done(),
            "steps": st.step, "train_minutes": round(st.seconds / 60, 2),
            "train_tokens": st.tokens,
            "train_tokens_per_s": round(st.tokens / st.seconds, 1) if st.seconds else 0.0,
            "parameters": count_parameters(self.model),
            "best_valid_loss": st.best_valid_loss, "best_valid_ppl": perplexity(st.best_valid_loss),
            "test_loss": test_loss, "test_ppl": perplexity(test_loss), "test_tokens": test_tokens,
            "averaging_since_step": st.averaging_since,
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
        # Only the main thread may set handlers; a run in another thread stops by its budgets.
        if threading.current_thread() is not threading.main_thread():
            self.previous = {}
            return
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.trainer.pending_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.trainer.pending_signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def describe_device(device: torch.device) -> str:
    """'cuda (NVIDIA H200)' or 'cpu (2 threads)': where the run is, which a user on a machine
    with a GPU wants to see."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def _corpus_of(run_dir: Path, cfg: Config, vocab_size: int) -> Corpus:
    """The corpus an existing run was trained on; refuses data with another vocabulary."""
    corpus = load_corpus(resolve_data(cfg.data, recorded=True), cfg.min_count, cfg.max_vocab)
    if ckpt.read_vocab(run_dir, vocab_size).words != corpus.vocab.words:
        raise ckpt.RunDirError(
            f"{run_dir} was trained with another vocabulary than {cfg.data} gives (other "
            f"words or another frequency order; {vocab_size} vs {len(corpus.vocab)} words); "
            "use the run's original data")
    return corpus


def _train(trainer: Trainer, corpus: Corpus) -> dict:
    trainer.log(f"{trainer.cfg.data}: {corpus.summary()}")
    trainer.log(f"model: {count_parameters(trainer.model):,} parameters | on "
                f"{describe_device(trainer.device)}, {trainer.cfg.precision} | "
                f"run directory {trainer.run_dir}")
    with _StopOnSignal(trainer):
        results = trainer.train()
    distributed.leave(trainer.group)  # after a normal return only: a failing rank cannot wait
    return results


def _recorded(overrides: dict | None) -> dict:
    """Overrides with a `data` directory and `init_from` made absolute, as config.json records
    them."""
    overrides = dict(overrides or {})
    if "data" in overrides:
        overrides["data"] = recorded_data(overrides["data"])
    if "init_from" in overrides:
        overrides["init_from"] = ckpt.recorded_run(overrides["init_from"])
    return overrides


@contextlib.contextmanager
def _claimed(trainer: Trainer, run_dir: Path, create=None):
    """Take the run directory's lock (ckpt.locked), then let `create` write a new run's first
    files, and hold the lock for the body. Rank 0 does both; every rank learns whether it
    could, so that under torchrun no rank trains on alone into a collective that never comes
    (only rank 0's error is printed)."""
    with contextlib.ExitStack() as held:
        failure = None
        if trainer.group.is_main:
            try:
                held.enter_context(ckpt.locked(run_dir))
                if create:
                    create()
            except LstmlmError as e:
                failure = e
        if distributed.reduce([float(failure is not None)], trainer.group, "max",
                              trainer.device)[0]:
            raise failure or ckpt.RunDirError(f"rank 0 could not take {run_dir}")
        yield


def run_training(cfg: Config | None = None, out: Path | None = None, resume: Path | None = None,
                 overrides: dict | None = None, quiet: bool = False) -> dict:
    """Start a new run in `out` with `cfg`, or continue the run in `resume`.

    On resume only the budget fields (RESUMABLE_OVERRIDES) may be overridden. It may run in a
    thread other than the main one; there Ctrl-C and SIGTERM do not stop it, its budgets do.
    """
    if resume is None:
        cfg = dataclasses.replace(cfg)  # the caller's config stays theirs
        cfg.update(overrides or {})
        cfg.data = recorded_data(cfg.data)
        if cfg.finetune:  # it needs a trained run's weights to start from
            raise ConfigError("finetune is set by `lstmlm finetune RUN`, which starts from RUN's "
                              "weights; to average from the start use ntasgd or average_from")
        if cfg.init_from:  # its shape first: loading the data can take minutes
            cfg.init_from = ckpt.recorded_run(cfg.init_from)
            _check_shape_of(Path(cfg.init_from), cfg)
        corpus = load_corpus(resolve_data(cfg.data), cfg.min_count, cfg.max_vocab)
        trainer = Trainer(cfg, corpus, Path(out), quiet=quiet)
        if cfg.init_from:
            _init_from(trainer, corpus, Path(cfg.init_from))
        with _claimed(trainer, out, lambda: ckpt.create_run_dir(out, cfg, corpus.vocab)):
            if cfg.init_from:
                _start_from_weights(trainer, cfg.init_from)
            return _train(trainer, corpus)
    run_dir = Path(resume)
    cfg, vocab_size = ckpt.read_run_config(run_dir)
    overrides = _recorded(overrides)
    frozen = sorted(k for k, v in overrides.items()
                    if getattr(cfg, k) != v and k not in RESUMABLE_OVERRIDES)
    if frozen:
        raise ConfigError(
            f"cannot change {', '.join(frozen)} when resuming; only these can change: "
            f"{', '.join(RESUMABLE_OVERRIDES)}")
    cfg.update(overrides)
    corpus = _corpus_of(run_dir, cfg, vocab_size)
    trainer = Trainer(cfg, corpus, run_dir, quiet=quiet)
    with _claimed(trainer, run_dir):
        # Only now: a process that held the run until a moment ago may have just saved.
        has_state = (run_dir / ckpt.STATE).is_file()
        if (cfg.finetune or cfg.init_from) and not has_state:
            again = "`lstmlm finetune` on the base run" if cfg.finetune else "the same command"
            raise ckpt.RunDirError(
                f"{run_dir} has no checkpoint, so the weights it started from are not in it; "
                f"remove it and run {again} again")
        if has_state:
            trainer.load_state()
        else:  # stopped before its first checkpoint: nothing was lost but the time
            trainer.log(f"{run_dir} has no {ckpt.STATE} yet (stopped before its first checkpoint): "
                        "training from the start")
        trainer.trim_metrics()
        if trainer.group.is_main:  # what a kill inside a write left behind (fileio.atomic_write)
            for stale in run_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        trainer._write(lambda: ckpt.write_config(run_dir, cfg, vocab_size))
        return _train(trainer, corpus)


def run_finetune(run_dir: Path, out: Path | None = None, overrides: dict | None = None,
                 quiet: bool = False) -> dict:
    """AWD-LSTM fine-tuning: restart averaged SGD from a run's best weights until validation
    stops improving (the NT-ASGD trigger), in a new run directory (default RUN_DIR-finetune).
    The base run is only read."""
    run_dir = Path(run_dir)
    cfg, vocab_size = ckpt.read_run_config(run_dir)
    overrides = _recorded(overrides)
    if "finetune" in overrides:
        raise ConfigError("lstmlm finetune always fine-tunes; drop --finetune")
    if "init_from" in overrides:
        raise ConfigError(f"lstmlm finetune starts from {run_dir}'s weights; drop --init-from")
    if cfg.optimizer != "sgd" and "optimizer" not in overrides:
        raise ConfigError(
            f"{run_dir} was trained with {cfg.optimizer}, and fine-tuning averages SGD steps: "
            f"pass --set optimizer=sgd and an SGD --lr (awd-lstm's is 30)")
    # The shape first: a changed one would fail the config's checks with less to the point.
    wanted = dataclasses.replace(cfg)
    wanted.update(overrides, validate=False)
    reshaped = [k for k in _reshaped(wanted, cfg) if k in overrides]
    if reshaped:
        raise ConfigError(f"fine-tuning starts from {run_dir}'s weights, so the model's shape "
                          f"cannot change: drop {', '.join(reshaped)}")
    # Fine-tuning averages from its first step, which replaces any `average_from` of the base.
    cfg.update({"finetune": True, "ntasgd": True, "average_from": 0.0, **overrides})
    out = Path(out) if out else run_dir.with_name(run_dir.name + "-finetune")
    corpus = _corpus_of(run_dir, cfg, vocab_size)
    trainer = Trainer(cfg, corpus, out, quiet=quiet)
    path = run_dir / ckpt.WEIGHTS
    ckpt.load_weights(trainer.model, ckpt.read_tensors(path)[0], path)
    trainer.start_averaging()
    with _claimed(trainer, out, lambda: ckpt.create_run_dir(out, cfg, corpus.vocab)):
        _start_from_weights(trainer, run_dir)
        return _train(trainer, corpus)


def _reshaped(cfg: Config, base: Config) -> dict[str, tuple]:
    """The shape settings in which `cfg` differs from `base` (weights of one do not fit the
    other), each with its value in `base` and in `cfg`."""
    base_shape = base.shape()
    return {k: (base_shape[k], v) for k, v in cfg.shape().items() if v != base_shape[k]}


def _check_shape_of(base: Path, cfg: Config) -> None:
    """Refuse to start from the run in `base` a model whose weights would not fit."""
    reshaped = _reshaped(cfg, ckpt.read_run_config(base)[0])
    if reshaped:
        changes = ", ".join(f"{k} {there!r} there, {here!r} here"
                            for k, (there, here) in reshaped.items())
        raise ConfigError(f"--init-from {base}: the model's shape must be that run's ({changes}); "
                          "leave out --preset to take the run's settings")


def _init_from(trainer: Trainer, corpus: Corpus, base: Path) -> None:
    """Set the new model's weights from the run in `base`, mapped to this corpus's vocabulary
    (transfer.py)."""
    _, base_vocab, base_model = ckpt.load_run(base)
    kept, fresh = transfer_weights(trainer.model, corpus.vocab, base_model, base_vocab)
    trainer.log(f"weights from {base}: the words it knows keep their rows ({kept:,} of "
                f"{len(corpus.vocab):,}), new words start from the mean row"
                + (f"; {', '.join(fresh)} start afresh" if fresh else ""))


def _start_from_weights(trainer: Trainer, source: Path | str) -> None:
    """The loaded weights are the best so far (a run that never beats them keeps them), and
    the checkpoint of step 0, so that a resume starts from them and not from a new model."""
    trainer.state.best_valid_loss, _ = trainer.evaluate(trainer.model, trainer.valid_data, "valid")
    trainer.model.train()
    trainer.save_best_weights()
    trainer.log(f"{source}: valid ppl {perplexity(trainer.state.best_valid_loss):.2f} to beat")
    trainer.save_state()
