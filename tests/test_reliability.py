"""Faults injected on purpose: kills, signals, non-finite numbers, a full disk, bad input,
hostile files. docs/reliability.md says what each test shows."""

import errno
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

import lstmlm
from lstmlm import checkpoint as ckpt
from lstmlm import data, datasets, fileio, train
from lstmlm.cli import main
from lstmlm.config import Config, load_preset
from lstmlm.data import EOS, UNK
from lstmlm.datasets import Dataset, DownloadError, download_dataset
from lstmlm.train import DivergedError, Trainer, run_finetune, run_training
from tests.helpers import make_corpus, metrics, snapshot

SMALL = dict(embedding_size=16, hidden_size=16, num_layers=1, batch_size=4, bptt=8,
             valid_batch_size=2, test_batch_size=2, lr=1.0)
# The killed/signalled runs: the lstm-baseline preset (dropout 0.2, so the RNG matters) made
# tiny; validation every 25 steps, a checkpoint every 0.12 s; 2 epochs of 234 steps.
KILLED = dict(SMALL, epochs=2, eval_interval=25, checkpoint_minutes=0.002, seed=7)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)


def config(corpus, **kw) -> Config:
    return Config(data=str(corpus), **{**SMALL, **kw})


def state_meta(run_dir: Path) -> tuple[dict, list]:
    _, meta = ckpt.read_tensors(run_dir / ckpt.STATE)
    return json.loads(meta["trainer"]), json.loads(meta["param_groups"])


def all_finite(path: Path) -> bool:
    tensors, _ = ckpt.read_tensors(path)
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def user_error(capsys, *argv, after_training: bool = False) -> str:
    """Run the CLI in-process; it must fail with status 1 and one error line on stderr, the
    only line unless training had started (and logged its progress) before the error."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and "Traceback" not in err, err
    lines = err.splitlines()
    assert [line for line in lines if "lstmlm: error" in line] == lines[-1:], err
    assert lines[-1].startswith("lstmlm: error: ") and (len(lines) == 1 or after_training), err
    return lines[-1]


def check_loads(run: Path) -> None:
    """What must hold after any kill: every file that exists loads."""
    cfg, vocab_size = ckpt.read_run_config(run)
    ckpt.read_vocab(run, vocab_size)
    if (run / ckpt.STATE).exists():
        _, meta = ckpt.read_tensors(run / ckpt.STATE)
        assert json.loads(meta["trainer"])["step"] >= 0
    if (run / ckpt.WEIGHTS).exists():
        ckpt.load_run(run)


# ---- 1, 2: SIGKILL and SIGTERM ----------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(tiny_corpus, tmp_path_factory) -> Path:
    """The uninterrupted run that the killed and signalled runs must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_CACHE", str(root / "cache"))
        run_training(load_preset("lstm-baseline"), out=root / "run", quiet=True,
                     overrides=dict(KILLED, data=str(tiny_corpus)))
    return root / "run"


# `python -m lstmlm`, except that with $KILL_AT_FSYNC=N it SIGKILLs itself when it fsyncs its
# N-th checkpoint (model or state .safetensors, not the tokenized-data cache): in the middle of an atomic write, after the
# temporary file is written, before the rename.
LAUNCH = """
import os, signal, sys
n = int(os.environ.get("KILL_AT_FSYNC", "0"))
real, calls = os.fsync, [0]
def fsync(fd):
    name = os.readlink(f"/proc/self/fd/{fd}")
    if ".safetensors." in name and name.endswith(".tmp") and "/tokenized/" not in name:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    real(fd)
os.fsync = fsync
from lstmlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(args: list, log: Path, kill_at_fsync: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILL_AT_FSYNC": str(kill_at_fsync)}
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", LAUNCH, "train", *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)


def wait_for_training(proc: subprocess.Popen, log: Path) -> None:
    """Until the run logs its model line (training starts right after) or exits."""
    deadline = time.monotonic() + 30
    while "model:" not in log.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)


def killed_args(corpus: Path, run: Path) -> list:
    return ["--data", corpus, "--out", run,
            *[a for k, v in KILLED.items() for a in ("--set", f"{k}={v}")]]


def assert_same_run(run: Path, straight: Path) -> None:
    a = json.loads((straight / ckpt.RESULTS).read_text())
    b = json.loads((run / ckpt.RESULTS).read_text())
    assert b["steps"] == a["steps"] and b["stop_reason"] == a["stop_reason"] == "epochs"
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-6)
    ma, mb = metrics(straight), metrics(run)
    assert [m["step"] for m in mb] == [m["step"] for m in ma]  # the resumes left no duplicates
    for x, y in zip(ma, mb):
        assert y["valid_loss"] == pytest.approx(x["valid_loss"], rel=1e-6), x["step"]
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6), x["step"]
        assert y["lr"] == x["lr"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_sigkill_at_random_moments_then_resume_gives_the_same_run(tiny_corpus, tmp_path,
                                                                  request):
    rng = random.Random(2024)
    run, log = tmp_path / "run", tmp_path / "log"
    args = killed_args(tiny_corpus, run)
    # Round 0 kills the new run inside its first checkpoint write, so there is no
    # state.safetensors and the resume starts over; rounds 1 and 3 kill at a random moment
    # after the first periodic checkpoint (every 0.12 s), round 2 inside a random later checkpoint
    # write. Each round resumes the run the previous one killed.
    plan = [("fsync", 1), ("timer", rng.uniform(0.2, 0.6)), ("fsync", rng.randint(1, 6)),
            ("timer", rng.uniform(0.2, 0.6))]
    for i, (how, when) in enumerate(plan):
        proc = start(args, log, kill_at_fsync=when if how == "fsync" else 0)
        if i == 0:
            reference = request.getfixturevalue("straight")  # while the subprocess starts
        if how == "timer":
            wait_for_training(proc, log)
            while not (run / ckpt.STATE).exists() and proc.poll() is None:  # a loaded machine
                time.sleep(0.01)
            time.sleep(when)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (i, log.read_text())
        check_loads(run)
        assert (run / ckpt.STATE).exists() == (i > 0), (i, log.read_text())
        if how == "fsync":  # killed inside a write: its temporary file is left behind
            assert list(run.glob(".*.tmp")), i
        args = ["--resume", run]
    # The last kill lost at most the steps since the last checkpoint; now let the run finish.
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(run, reference)
    assert not list(run.glob(".*.tmp"))  # the resumes removed what the kills left


def test_sigterm_saves_mid_epoch_and_resume_continues_from_there(tiny_corpus, tmp_path,
                                                                  straight, monkeypatch, capsys):
    # A real SIGTERM, delivered to this process right after the validation at step 25 (of
    # 234 in the epoch). tests/test_train.py sends SIGINT to a `python -m lstmlm` subprocess.
    real_validate = Trainer.validate

    def validate(self, *args, **kw):
        loss = real_validate(self, *args, **kw)
        if self.state.step == 25:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "validate", validate)
        code = main(["train", *map(str, killed_args(tiny_corpus, run))])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out) == {"stop_reason": "interrupted", "steps": 25}
    assert f"SIGTERM received: saved step 25 to {run}; continue with `lstmlm train --resume " \
           f"{run}`" in err
    state, _ = state_meta(run)
    assert (state["epoch"], state["step"], state["position"]) == (0, 25, 25 * KILLED["bptt"])
    assert not (run / ckpt.RESULTS).exists()
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(run, straight)


def test_resume_of_a_run_without_state_starts_from_the_beginning(tiny_corpus, tmp_path, capsys):
    cfg = dict(eval_interval=20, max_steps=45)
    a = run_training(config(tiny_corpus, **cfg), out=tmp_path / "a", quiet=True)
    run = tmp_path / "b"
    run_training(config(tiny_corpus, **dict(cfg, max_steps=25)), out=run, quiet=True)
    # As if killed before the first checkpoint: config.json and vocab.txt, maybe a metrics
    # line and best weights, and no state.
    (run / ckpt.STATE).unlink()
    (run / ckpt.RESULTS).unlink()
    code = main(["train", "--resume", str(run), "--max-steps", "45"])
    _, err = capsys.readouterr()
    assert code == 0 and "no state.safetensors yet" in err and "training from the start" in err
    b = json.loads((run / ckpt.RESULTS).read_text())
    assert b["steps"] == 45 and b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-6)
    assert [m["step"] for m in metrics(run)] == [20, 40, 45]


def test_resume_drops_a_metrics_line_cut_short_by_a_kill(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    run_training(config(tiny_corpus, eval_interval=10, max_steps=20), out=run, quiet=True)
    with open(run / ckpt.METRICS, "a") as f:
        f.write('{"epoch": 0.2, "step": 30, "valid_l')  # a kill in the middle of an append
    run_training(resume=run, overrides={"max_steps": 30}, quiet=True)
    assert [m["step"] for m in metrics(run)] == [10, 20, 30]


# ---- 3: non-finite numbers ------------------------------------------------------------------

@pytest.fixture
def saved(monkeypatch) -> list:
    """Every tensor file the trainer writes is checked to be finite when written."""
    written = []
    real = ckpt.write_tensors

    def write_tensors(path, tensors, metadata=None):
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), \
            f"non-finite tensor written to {path}"
        written.append(Path(path).name)
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "write_tensors", write_tensors)
    return written


def test_absurd_lr_rolls_back_lowers_the_lr_and_recovers(tiny_corpus, tmp_path, capsys, saved):
    run = tmp_path / "run"
    # lr 1e12 without clipping: the loss is nan within a few steps, before any checkpoint, so
    # the trainer goes back to its starting state, with lr 1e12 * 1e-12 = 1.
    cfg = config(tiny_corpus, lr=1e12, clip=0.0, nan_lr_factor=1e-12, eval_interval=10,
                 max_steps=30)
    results = run_training(cfg, out=run, quiet=False)
    err = capsys.readouterr().err
    assert "the training loss became nan; rolled back to step 0 with the lr lowered to 1 " \
           "(rollback 1 of at most 3)" in err
    assert results["steps"] == 30 and results["test_ppl"] < 100
    assert [m["lr"] for m in metrics(run)][0] == 1.0
    state, groups = state_meta(run)
    assert state["nan_rollbacks"] == 1 and groups[0]["lr"] <= 1.0
    assert all_finite(run / ckpt.WEIGHTS) and all_finite(run / ckpt.STATE)
    # The lowered lr is part of the resumable state.
    run_training(resume=run, overrides={"max_steps": 50}, quiet=True)
    assert all(m["lr"] <= 1.0 for m in metrics(run)) and state_meta(run)[0]["nan_rollbacks"] == 1
    assert ckpt.WEIGHTS in saved and ckpt.STATE in saved


def test_absurd_lr_gives_up_after_max_nan_retries(tiny_corpus, tmp_path, capsys, saved):
    run = tmp_path / "run"
    line = user_error(capsys, "train", "--data", tiny_corpus, "--out", run,
                      *[a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")],
                      "--lr", "1e8", "--clip", "0", "--checkpoint-steps", "5",
                      "--eval-interval", "10", "--max-nan-retries", "2", after_training=True)
    assert "training diverged: the training loss became" in line
    assert "2 rollback(s)" in line and "lr now 2.5e+07" in line and "--max-nan-retries" in line
    # The last good checkpoint (the one rolled back to) is intact and finite.
    # (it may have been saved after a rollback, at a lowered lr: how far each lr gets before it
    # overflows depends on the CPU's kernels)
    state, groups = state_meta(run)
    assert state["step"] % 5 == 0 and groups[0]["lr"] in (1e8, 5e7, 2.5e7)
    assert all_finite(run / ckpt.STATE) and all_finite(run / ckpt.WEIGHTS)
    ckpt.load_run(run)


def test_no_retries_stops_at_the_first_non_finite_loss(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    cfg = config(tiny_corpus, lr=1e12, clip=0.0, eval_interval=10, max_nan_retries=0)
    with pytest.raises(DivergedError, match=r"^training diverged: the training loss became "
                                            r"nan after step \d+, with 0 rollback"):
        run_training(cfg, out=run, quiet=True)
    assert sorted(p.name for p in run.iterdir()) == [ckpt.LOCK, ckpt.CONFIG, ckpt.VOCAB]  # no save


def test_a_nan_gradient_norm_is_caught_before_the_step(tiny_corpus, tmp_path, monkeypatch,
                                                       capsys, saved):
    real_clip, calls = train.clip_grad_norm, []

    def clip(params, max_norm):
        calls.append(1)
        norm = real_clip(params, max_norm)
        return float("nan") if len(calls) == 7 else norm

    steps = []
    real_step = Trainer.step_optimizer
    monkeypatch.setattr(train, "clip_grad_norm", clip)
    monkeypatch.setattr(Trainer, "step_optimizer",
                        lambda self, n: steps.append(self.state.step) or real_step(self, n))
    run = tmp_path / "run"
    run_training(config(tiny_corpus, checkpoint_steps=5, max_steps=10), out=run, quiet=False)
    assert "step 6: the gradient norm became nan; rolled back to step 5 with the lr lowered " \
           "to 0.5" in capsys.readouterr().err
    # Steps 1-6, nothing for the failed 7th, then 6-10 again from the checkpoint at step 5.
    assert steps == [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert metrics(run)[-1]["lr"] == 0.5 and state_meta(run)[0]["nan_rollbacks"] == 1


def test_nan_weights_are_never_saved(tiny_corpus, tmp_path, monkeypatch, capsys, saved):
    real_step = Trainer.step_optimizer

    def poisoned(self, n):
        real_step(self, n)
        if self.state.step == 9 and self.state.nan_rollbacks == 0:  # becomes step 10: a save
            with torch.no_grad():
                self.model.decoder.bias.fill_(float("nan"))

    monkeypatch.setattr(Trainer, "step_optimizer", poisoned)
    run = tmp_path / "run"
    run_training(config(tiny_corpus, checkpoint_steps=5, max_steps=12), out=run, quiet=False)
    assert "step 10: a weight or the hidden state became inf/nan; rolled back to step 5" in \
        capsys.readouterr().err
    assert saved.count(ckpt.STATE) == 3  # steps 5, (10 refused), 10 again, 12
    assert all_finite(run / ckpt.STATE) and state_meta(run)[0]["step"] == 12


def test_a_nan_validation_loss_is_never_best(tiny_corpus, tmp_path, monkeypatch, capsys, saved):
    from lstmlm import train

    real_evaluate, calls = train.evaluate, []

    def evaluate(*args):
        calls.append(1)
        loss, tokens = real_evaluate(*args)
        return (float("nan") if len(calls) == 2 else loss), tokens

    monkeypatch.setattr(train, "evaluate", evaluate)
    run = tmp_path / "run"
    run_training(config(tiny_corpus, eval_interval=10, max_steps=30), out=run, quiet=False)
    assert "step 20: the validation loss became nan; rolled back to step 10" in \
        capsys.readouterr().err
    lines = metrics(run)
    assert [m["step"] for m in lines] == [10, 20, 30]
    assert all(m["valid_loss"] == m["valid_loss"] for m in lines)  # no nan recorded
    assert saved.count(ckpt.WEIGHTS) >= 1 and all_finite(run / ckpt.WEIGHTS)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.5, 2.0])
def test_nan_lr_factor_must_be_between_0_and_1(capsys, tmp_path, value):
    line = user_error(capsys, "train", "--data", make_corpus(tmp_path / "d"), "--out",
                      tmp_path / "run", "--nan-lr-factor", value)
    assert f"nan_lr_factor must be in (0, 1), got {value}" in line
    assert not (tmp_path / "run").exists()


# ---- 4: a full disk ----------------------------------------------------------------------------

def no_space(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class HalfWrite:
    """A file that takes half of what it is given, then finds the disk full."""

    def __init__(self, path, mode):
        self.file = open(path, mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        no_space()


@pytest.mark.parametrize("fault", ["fsync", "write"])
def test_a_full_disk_during_a_checkpoint(tiny_corpus, tmp_path, monkeypatch, capsys, fault):
    run = tmp_path / "run"
    run_training(config(tiny_corpus, checkpoint_steps=5, max_steps=5), out=run, quiet=True)
    before = snapshot(run)
    real_save = Trainer.save_state
    with monkeypatch.context() as mp:
        def full_from_now_on(self):  # the disk fills up once training has started
            if fault == "fsync":
                mp.setattr(fileio.os, "fsync", no_space)
            else:
                mp.setattr(fileio, "open", HalfWrite, raising=False)
            real_save(self)

        mp.setattr(Trainer, "save_state", full_from_now_on)
        line = user_error(capsys, "train", "--resume", run, "--max-steps", "20",
                      after_training=True)
    assert f"cannot write to {run} (No space left on device); the previous checkpoint is " \
           f"intact" in line and f"--resume {run}" in line
    after = snapshot(run)
    for name in (ckpt.STATE, ckpt.WEIGHTS, ckpt.METRICS, ckpt.VOCAB):
        assert after[name] == before[name], name
    assert not list(run.glob(".*.tmp"))  # the half-written file is gone
    ckpt.read_tensors(run / ckpt.STATE)
    # Space freed: the run goes on from the intact checkpoint.
    assert run_training(resume=run, overrides={"max_steps": 20}, quiet=True)["steps"] == 20


# ---- 5: periodic checkpoints -----------------------------------------------------------------

def test_checkpoint_every_n_steps(tiny_corpus, tmp_path, monkeypatch):
    steps, real_save = [], Trainer.save_state
    monkeypatch.setattr(Trainer, "save_state",
                        lambda self: steps.append(self.state.step) or real_save(self))
    run = tmp_path / "run"
    run_training(config(tiny_corpus, checkpoint_steps=4, checkpoint_minutes=0.0, max_steps=11),
                 out=run, quiet=True)
    assert steps == [4, 8, 11]  # every 4 steps, and at the stop
    # A budget field: a resume may change it.
    steps.clear()
    run_training(resume=run, overrides={"max_steps": 16, "checkpoint_steps": 2}, quiet=True)
    assert steps == [12, 14, 16, 16]  # and again after the stop's validation


def test_checkpoint_every_n_minutes(tiny_corpus, tmp_path, monkeypatch):
    steps, real_save = [], Trainer.save_state
    monkeypatch.setattr(Trainer, "save_state",
                        lambda self: steps.append(self.state.step) or real_save(self))
    run_training(config(tiny_corpus, checkpoint_minutes=1e-9, max_steps=6), out=tmp_path / "a",
                 quiet=True)
    assert steps == [1, 2, 3, 4, 5, 6, 6]  # every step, and after the stop's validation
    steps.clear()
    run_training(config(tiny_corpus, checkpoint_minutes=0.0, max_steps=6), out=tmp_path / "b",
                 quiet=True)
    assert steps == [6]  # periodic checkpoints off: only the stop saves (after validating)


# ---- 6: bad input ------------------------------------------------------------------------------

SMALL_ARGS = ["--embedding-size", "8", "--hidden-size", "8", "--num-layers", "1",
              "--batch-size", "2", "--bptt", "4", "--valid-batch-size", "1",
              "--test-batch-size", "1", "--epochs", "1"]


def test_a_test_split_of_unknown_words_trains_and_reports_them(capsys, tmp_path):
    d = make_corpus(tmp_path / "d", test="zebra quinoa yak\n" * 5)
    assert main(["train", "--data", str(d), "--out", str(tmp_path / "run"), *SMALL_ARGS]) == 0
    out, err = capsys.readouterr()
    assert "words outside the vocabulary mapped to <unk>: test 15" in err
    assert json.loads(out)["test_ppl"] > 1
    assert main(["evaluate", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unknown_words"] == 15


def test_an_enormous_line(capsys, tmp_path):
    # A 5 MB training line of 1.25M words, and a test line that is one 5 MB word.
    d = make_corpus(tmp_path / "d", train="ab cd ef gh " * 437_000 + "\n",
                     valid="ab cd ef\n" * 5, test="x" * 5_000_000 + "\nab cd\n")
    started = time.monotonic()
    assert main(["train", "--data", str(d), "--out", str(tmp_path / "run"), *SMALL_ARGS,
                 "--max-steps", "3"]) == 0
    assert time.monotonic() - started < 30
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 3 and "mapped to <unk>: test 1\n" in err
    corpus = data.load_corpus(d)
    assert corpus.train.numel() == 4 * 437_000 + 1 and corpus.unknown["test"] == 1


def test_control_characters_and_literal_special_tokens(tmp_path):
    # Python's str.split() whitespace (form feed, \x1c-\x1f, NEL, U+2028) separates words;
    # only \n, \r\n and \r end lines; other control characters belong to words. A literal
    # <eos> is the end-of-line token and a literal <unk> the unknown word, as in the reference
    # code (PTB's text contains <unk>).
    train = "a \x01b c\x1b[0m\n<eos> d\x0ce <unk>\nf\x1fg\x85h\u2028i\x7f\n"
    d = make_corpus(tmp_path / "d", train=train, valid="a <unk> zz\n", test="<eos>\n")
    corpus = data.tokenize(d)
    v = corpus.vocab
    assert v.decode(corpus.train.tolist()) == [
        "a", "\x01b", "c\x1b[0m", EOS, EOS, "d", "e", UNK, EOS, "f", "g", "h", "i\x7f", EOS]
    assert v.decode(corpus.valid.tolist()) == ["a", UNK, UNK, EOS]
    assert corpus.unknown == {"train": 0, "valid": 1, "test": 0}  # only zz is unseen
    assert v.decode(corpus.test.tolist()) == [EOS, EOS]
    v.save(tmp_path / "vocab.txt")
    assert data.Vocab.load(tmp_path / "vocab.txt").words == v.words


def test_control_characters_survive_a_run_directory(capsys, tmp_path):
    d = make_corpus(tmp_path / "d", train="a \x01b c\x1b[0m <unk>\n" * 20)
    run = tmp_path / "run"
    assert main(["train", "--data", str(d), "--out", str(run), *SMALL_ARGS]) == 0
    capsys.readouterr()
    _, vocab, _ = ckpt.load_run(run)
    assert "\x01b" in vocab.words and "c\x1b[0m" in vocab.words


def test_tying_needs_matching_sizes(capsys, tmp_path):
    line = user_error(capsys, "train", "--data", make_corpus(tmp_path / "d"), "--out",
                      tmp_path / "run", *SMALL_ARGS, "--tie-weights", "true",
                      "--hidden-size", "12")
    assert "tie_weights needs the last LSTM layer's size (12) to equal embedding_size (8)" in line
    assert not (tmp_path / "run").exists()


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run_copy"))


def edit_config(run: Path, **changes) -> None:
    cfg = json.loads((run / ckpt.CONFIG).read_text())
    for key, value in changes.items():
        if key == "format_version":
            cfg[key] = value
        else:
            cfg["config"][key] = value
    (run / ckpt.CONFIG).write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / ckpt.STATE).write_bytes((run / ckpt.STATE).read_bytes()[:100]),
     "state.safetensors: damaged or not a safetensors file"),
    (lambda run: edit_config(run, hidden_size=32),
     "state.safetensors: weights do not match config.json"),
    (lambda run: edit_config(run, format_version=999), "newer lstmlm (format 999"),
    (lambda run: (run / ckpt.VOCAB).write_text("<unk>\n<eos>\nthe\n"), "inconsistent"),
])
def test_resume_refuses_a_damaged_run_and_writes_nothing(capsys, run_copy, tiny_corpus, damage,
                                                         message):
    edit_config(run_copy, data=str(tiny_corpus))  # the copy's data dir is the session's
    damage(run_copy)
    before = snapshot(run_copy)
    assert message in user_error(capsys, "train", "--resume", run_copy)
    assert snapshot(run_copy) == before


def test_generate_from_a_prompt_of_unknown_words(capsys, tiny_run):
    with pytest.warns(UserWarning, match=r"3 prompt word\(s\) not in the vocabulary"):
        code = main(["generate", str(tiny_run), "--prompt", "zebra quinoa yak", "--seed", "1",
                     "--max-tokens", "5"])
    out, _ = capsys.readouterr()
    assert code == 0 and out.startswith("zebra quinoa yak")


def test_generate_refuses_a_huge_max_tokens(capsys, tiny_run):
    line = user_error(capsys, "generate", tiny_run, "--prompt", "the", "--max-tokens", 10**12)
    assert "max tokens must be between 1 and 100,000, got 1000000000000" in line


# ---- 8: hostile files ----------------------------------------------------------------------------

class Payload:
    """Unpickling it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_pickle_where_a_checkpoint_belongs_is_refused(capsys, run_copy, tiny_corpus, tmp_path,
                                                       kind):
    # The payload works: unpickling it does create its marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned"
    edit_config(run_copy, data=str(tiny_corpus))
    for name in (ckpt.WEIGHTS, ckpt.STATE):
        if kind == "pickle":
            (run_copy / name).write_bytes(pickle.dumps(Payload(marker)))
        else:
            torch.save({"decoder.bias": Payload(marker)}, run_copy / name)
    for argv in (["evaluate", run_copy], ["generate", run_copy, "--prompt", "the"],
                 ["train", "--resume", run_copy], ["finetune", run_copy]):
        line = user_error(capsys, *argv)
        assert "damaged or not a safetensors file" in line, argv
    with pytest.raises(ckpt.RunDirError):
        lstmlm.load(run_copy)
    with pytest.raises(ckpt.RunDirError):
        run_finetune(run_copy, out=tmp_path / "ft", quiet=True)
    assert not marker.exists()


def test_a_pickle_in_the_corpus_cache_is_ignored(tmp_path):
    d = make_corpus(tmp_path / "d")
    first = data.load_corpus(d)
    (cache_file,) = (tmp_path / "cache" / "tokenized").iterdir()
    marker = tmp_path / "pwned"
    cache_file.write_bytes(pickle.dumps(Payload(marker)))
    assert torch.equal(data.load_corpus(d).train, first.train)
    assert not marker.exists()


TINY_SPLITS = {"train": b"a b c\nd e\n", "valid": b"a b\n", "test": b"c\n\n"}  # 7, 3, 3 tokens


def hostile_zip(path: Path, members: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for split, member in members.items():
            z.writestr(member, TINY_SPLITS[split])


def hostile_tar(path: Path, members: dict[str, str], link_to: Path | None = None) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for split, member in members.items():
            info = tarfile.TarInfo(member)
            if link_to is not None and split == "train":
                info.type, info.linkname = tarfile.SYMTYPE, str(link_to)
                tar.addfile(info)
            else:
                info.size = len(TINY_SPLITS[split])
                tar.addfile(info, io.BytesIO(TINY_SPLITS[split]))


@pytest.mark.parametrize("archive", ["zip", "tar"])
def test_archive_members_with_dot_dot_or_absolute_names_write_only_the_three_splits(
        tmp_path, monkeypatch, archive):
    outside = tmp_path / "outside"
    members = {"train": "../evil/train.txt", "valid": str(outside / "abs" / "valid.txt"),
               "test": "../../" * 20 + "tmp/evil-test.txt"}
    path = tmp_path / f"hostile.{archive}"
    (hostile_zip if archive == "zip" else hostile_tar)(path, members)
    monkeypatch.setitem(datasets.DATASETS, "hostile",
                        Dataset(path.as_uri(), members, None, {"train": 7, "valid": 3, "test": 3}))
    root = tmp_path / "data"
    before = sorted(p for p in tmp_path.rglob("*"))
    directory = download_dataset("hostile", root=root)
    assert sorted(p.name for p in directory.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    assert (directory / "train.txt").read_bytes() == TINY_SPLITS["train"]
    created = sorted(set(tmp_path.rglob("*")) - set(before))
    assert created == [root, directory, *sorted(directory.iterdir())]
    assert not outside.exists() and not Path("/tmp/evil-test.txt").exists()


def test_a_symlink_member_is_not_followed(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("a b c\nd e\n")  # would even pass the token count
    members = {s: f"tiny/{s}.txt" for s in TINY_SPLITS}
    path = tmp_path / "symlink.tgz"
    hostile_tar(path, members, link_to=secret)
    monkeypatch.setitem(datasets.DATASETS, "linked",
                        Dataset(path.as_uri(), members, None, {"train": 7, "valid": 3, "test": 3}))
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"the archive has no tiny/train\.txt"):
        download_dataset("linked", root=root)
    assert list(root.iterdir()) == []
