import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import lstmlm
from lstmlm import checkpoint as ckpt
from lstmlm.config import Config, ConfigError
from lstmlm.errors import LstmlmError
from lstmlm.train import run_finetune, run_training
from tests.helpers import Terminal, metrics, snapshot

SENTENCES = ["the cat sat on the mat", "a dog ran to the red house",
             "we like green tea", "it is a big day for the cat"]


@pytest.fixture
def corpus(tmp_path):
    """A small, perfectly learnable corpus: the same four sentences over and over."""
    d = tmp_path / "corpus"
    d.mkdir()
    for split, repeats in (("train", 30), ("valid", 3), ("test", 3)):
        (d / f"{split}.txt").write_text("".join(f" {s} \n" for s in SENTENCES * repeats))
    return d


def tiny(corpus, **kw):
    values = dict(data=str(corpus), embedding_size=24, hidden_size=32, num_layers=1,
                  batch_size=4, bptt=10, valid_batch_size=2, test_batch_size=2, lr=2.0,
                  dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0, epochs=1, seed=3)
    values.update(kw)
    return Config(**values)


def test_tiny_model_learns_a_tiny_corpus(corpus, tmp_path):
    results = run_training(tiny(corpus, epochs=12, lr=0.02, optimizer="adam", lr_decay=1.0),
                           out=tmp_path / "run", quiet=True)
    assert results["stop_reason"] == "epochs"
    assert results["best_valid_ppl"] < 2.0 and results["test_ppl"] < 2.0
    lines = metrics(tmp_path / "run")
    assert len(lines) == 12 and lines[-1]["valid_ppl"] < lines[0]["valid_ppl"] / 3
    assert set(lines[0]) >= {"epoch", "step", "seconds", "tokens_per_s", "train_loss",
                             "train_ppl", "valid_loss", "valid_ppl", "lr"}


def test_run_directory_layout(corpus, tmp_path):
    run = tmp_path / "run"
    results = run_training(tiny(corpus, max_steps=7, eval_interval=5), out=run, quiet=True)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [ckpt.CONFIG, ckpt.VOCAB, ckpt.WEIGHTS, ckpt.STATE, ckpt.METRICS, ckpt.RESULTS,
         ckpt.LOCK])
    assert results["stop_reason"] == "max_steps" and results["steps"] == 7
    # Validated at step 5 and once more when stopping at step 7.
    assert [m["step"] for m in metrics(run)] == [5, 7]
    saved = json.loads((run / ckpt.RESULTS).read_text())
    assert saved["test_ppl"] == pytest.approx(results["test_ppl"])
    cfg, vocab_size = ckpt.read_run_config(run)
    assert cfg.max_steps == 7 and vocab_size == len((run / ckpt.VOCAB).read_text().split("\n")) - 1


def test_test_perplexity_is_that_of_the_best_weights(corpus, tmp_path):
    from lstmlm.data import batchify, load_corpus
    from lstmlm.evaluate import evaluate

    # Validation text other than the test split's, so that a mix-up of the two shows.
    (corpus / "valid.txt").write_text(" we like green tea \n it is a big day for the cat \n" * 3)
    run = tmp_path / "run"
    results = run_training(tiny(corpus, epochs=2, eval_interval=3, lr=5.0, lr_decay=1.0), out=run,
                           quiet=True)
    assert not metrics(run)[-1]["best"]  # the last weights are not the best ones
    _, _, model = ckpt.load_run(run)
    splits = load_corpus(corpus)
    test_loss, _ = evaluate(model, batchify(splits.test, 2), 10)
    valid_loss, _ = evaluate(model, batchify(splits.valid, 2), 10)
    assert test_loss == pytest.approx(results["test_loss"], rel=1e-6)
    assert valid_loss == pytest.approx(results["best_valid_loss"], rel=1e-6)
    assert valid_loss == pytest.approx(min(m["valid_loss"] for m in metrics(run)), rel=1e-6)
    assert valid_loss != pytest.approx(test_loss, rel=1e-3)


@pytest.mark.parametrize("stop_at", [4, 5])  # at a validation, and between two
def test_resume_gives_the_same_losses(corpus, tmp_path, stop_at):
    cfg = dict(epochs=2, eval_interval=6, dropout_output=0.3, lr_decay=2.0)
    straight = run_training(tiny(corpus, **cfg), out=tmp_path / "a", quiet=True)
    run_training(tiny(corpus, max_steps=stop_at, **cfg), out=tmp_path / "b", quiet=True)
    resumed = run_training(resume=tmp_path / "b", overrides={"max_steps": 0}, quiet=True)
    assert resumed["steps"] == straight["steps"]
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-6)
    a = {m["step"]: m for m in metrics(tmp_path / "a")}
    b = {m["step"]: m for m in metrics(tmp_path / "b")}
    later = [s for s in a if s > stop_at]
    assert later
    for s in later:
        assert b[s]["valid_loss"] == pytest.approx(a[s]["valid_loss"], rel=1e-6)
        assert b[s]["train_loss"] == pytest.approx(a[s]["train_loss"], rel=1e-6)
        assert b[s]["lr"] == a[s]["lr"]


def test_same_seed_same_numbers(corpus, tmp_path):
    one = run_training(tiny(corpus, dropout_output=0.3), out=tmp_path / "a", quiet=True)
    two = run_training(tiny(corpus, dropout_output=0.3), out=tmp_path / "b", quiet=True)
    other = run_training(tiny(corpus, dropout_output=0.3, seed=4), out=tmp_path / "c", quiet=True)
    assert one["test_loss"] == two["test_loss"] != other["test_loss"]


def test_lr_decays_on_plateau(corpus, tmp_path):
    # lr so high that validation sometimes gets worse: each check that does not improve on
    # the best divides the lr by 4, and only those (the metrics log the next step's lr).
    run_training(tiny(corpus, epochs=8, lr=50.0, clip=0.0), out=tmp_path / "run", quiet=True)
    lines = metrics(tmp_path / "run")
    assert any(not m["best"] for m in lines)
    lr = 50.0
    for m in lines:
        lr = lr if m["best"] else lr / 4
        assert m["lr"] == pytest.approx(lr)


def test_a_plateau_never_raises_the_lr(corpus, tmp_path):
    # An lr below min_lr (set so, or lowered there by a rollback) stays where it is.
    run_training(tiny(corpus, epochs=8, lr=50.0, clip=0.0, min_lr=60.0), out=tmp_path / "run",
                 quiet=True)
    lines = metrics(tmp_path / "run")
    assert any(not m["best"] for m in lines)
    assert all(m["lr"] == 50.0 for m in lines)


def test_cosine_schedule_anneals_over_the_budget(corpus, tmp_path, monkeypatch):
    used = []  # the lr of every optimizer step
    step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (
        used.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    run_training(tiny(corpus, epochs=1000, max_steps=8, eval_interval=4, lr_schedule="cosine",
                      min_lr=0.1, lr_decay=4.0), out=tmp_path / "run", quiet=True)
    expected = [0.1 + 1.9 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert used == pytest.approx(expected)
    # The metrics log the lr of the next step.
    assert [m["lr"] for m in metrics(tmp_path / "run")] == pytest.approx([expected[4], 0.1])
    with pytest.raises(ConfigError, match="lr_schedule must be plateau or cosine"):
        tiny(corpus, lr_schedule="linear").validate()


def test_progress_is_the_furthest_along_of_epochs_steps_and_minutes(corpus, tmp_path):
    from lstmlm.data import load_corpus
    from lstmlm.train import Trainer

    trainer = Trainer(tiny(corpus, epochs=100, max_steps=1000, max_minutes=10.0),
                      load_corpus(corpus), tmp_path / "r", quiet=True)
    trainer.state.step, trainer.state.seconds = 100, 300.0  # 10 % of the steps, half the time
    assert trainer.progress() == pytest.approx(0.5)
    trainer.state.step = 800
    assert trainer.progress() == pytest.approx(0.8)
    trainer.state.seconds = 6000.0
    assert trainer.progress() == 1.0


def test_cosine_schedule_replaces_the_plateau_decay(corpus, tmp_path):
    # With test_lr_decays_on_plateau's lr, some validations get worse (perplexity 1.00 ->
    # 1.01): no division by 4 here, only the cosine over the 8 epochs (the logged lr is that
    # of the next step).
    run_training(tiny(corpus, epochs=8, lr=50.0, clip=0.0, lr_schedule="cosine"),
                 out=tmp_path / "run", quiet=True)
    lines = metrics(tmp_path / "run")
    assert any(not m["best"] for m in lines)
    assert [m["lr"] for m in lines] == pytest.approx(
        [25 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 9)], abs=1e-9)


def test_time_budget_stops_cleanly(corpus, tmp_path):
    results = run_training(tiny(corpus, epochs=1000, max_minutes=0.02), out=tmp_path / "run",
                           quiet=True)
    assert results["stop_reason"] == "max_minutes"
    assert (tmp_path / "run" / ckpt.WEIGHTS).is_file() and results["test_ppl"] > 1


def test_eval_minutes_validates_by_training_time(corpus, tmp_path, monkeypatch):
    clock = iter(range(0, 10**6, 2))  # every reading of the clock is 2 s later
    monkeypatch.setattr("lstmlm.train.time.monotonic", lambda: next(clock))
    run_training(tiny(corpus, epochs=1000, max_steps=60, eval_interval=10**6, eval_minutes=0.5),
                 out=tmp_path / "run", quiet=True)
    seconds = [m["seconds"] for m in metrics(tmp_path / "run")]
    assert len(seconds) >= 4  # validations every 30 s of training, then the one at the stop
    assert all(b - a >= 30 for a, b in zip(seconds[:-2], seconds[1:-1]))


def test_bf16_autocast_trains_with_fp32_weights(corpus, tmp_path):
    full = run_training(tiny(corpus, epochs=4), out=tmp_path / "fp32", quiet=True)
    mixed = run_training(tiny(corpus, epochs=4, precision="bf16"), out=tmp_path / "bf16",
                         quiet=True)
    assert mixed["stop_reason"] == "epochs"
    assert mixed["test_ppl"] == pytest.approx(full["test_ppl"], rel=0.15)
    tensors, _ = ckpt.read_tensors(tmp_path / "bf16" / ckpt.WEIGHTS)
    assert {t.dtype for t in tensors.values()} == {torch.float32}


def test_fp16_on_cpu_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        run_training(tiny(corpus, precision="fp16"), out=tmp_path / "run", quiet=True)


@pytest.mark.parametrize("optimizer", [dict(momentum=0.9, lr=0.5), dict(optimizer="adam", lr=0.01)])
def test_resume_restores_the_optimizers_state(corpus, tmp_path, optimizer):
    """Momentum buffers and Adam's moments travel in state.safetensors."""
    cfg = dict(epochs=2, eval_interval=5, lr_decay=1.0, **optimizer)
    straight = run_training(tiny(corpus, **cfg), out=tmp_path / "a", quiet=True)
    run_training(tiny(corpus, max_steps=7, **cfg), out=tmp_path / "b", quiet=True)
    resumed = run_training(resume=tmp_path / "b", overrides={"max_steps": 0}, quiet=True)
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-6)


def test_variable_bptt_reads_every_training_token_once_per_epoch(corpus, tmp_path):
    results = run_training(tiny(corpus, variable_bptt=True, bptt=8, epochs=2), out=tmp_path / "r",
                           quiet=True)
    from lstmlm.data import batchify, load_corpus
    rows = batchify(load_corpus(corpus).train, 4).size(0)
    assert results["train_tokens"] == 2 * (rows - 1) * 4


def test_variable_bptt_windows_are_at_least_5_tokens():
    from lstmlm.train import sample_seq_len

    torch.manual_seed(0)
    lengths = [sample_seq_len(Config(variable_bptt=True, bptt=6)) for _ in range(3000)]
    assert min(lengths) == 5 and max(lengths) == 6 + Config().bptt_max_extra


def test_averaging_starts_only_with_ntasgd_or_average_from(corpus, tmp_path):
    run_training(tiny(corpus, epochs=2, eval_interval=3, lr=10.0, lr_decay=1.0, nonmono=1),
                 out=tmp_path / "r", quiet=True)
    losses = [m["valid_loss"] for m in metrics(tmp_path / "r")][:-1]  # the last: at the stop
    assert any(loss > min(losses[:i - 1]) for i, loss in enumerate(losses) if i > 1)  # a trigger
    results = json.loads((tmp_path / "r" / ckpt.RESULTS).read_text())
    assert results["averaging_since_step"] == -1


def test_each_epoch_starts_from_a_zero_state(corpus, tmp_path, monkeypatch):
    from lstmlm.model import LSTMLM

    sizes = []
    real = LSTMLM.init_hidden
    monkeypatch.setattr(LSTMLM, "init_hidden",
                        lambda self, batch: sizes.append(batch) or real(self, batch))
    run_training(tiny(corpus, epochs=3, valid_batch_size=3, test_batch_size=3),
                 out=tmp_path / "r", quiet=True)
    assert sizes.count(4) == 3  # training's batch: once per epoch (3 and 3: evaluation's)


def test_the_lr_decays_after_lr_patience_checks_without_improvement(corpus, tmp_path):
    from lstmlm.data import load_corpus
    from lstmlm.train import Trainer

    trainer = Trainer(tiny(corpus, lr=1.0, lr_decay=2.0, lr_patience=2), load_corpus(corpus),
                      tmp_path / "r", quiet=True)
    lrs = []
    for loss in (3.0, 3.5, 3.4, 3.2, 3.1, 2.0):
        trainer.decay_on_plateau(loss)
        lrs.append(trainer.base_lr)
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]


def test_the_validation_at_a_stop_schedules_nothing(corpus, tmp_path):
    """It is logged and may keep the best weights, but neither joins NT-ASGD's history nor
    decays the lr, so a resumed run matches an uninterrupted one."""
    run_training(tiny(corpus, max_steps=7, eval_interval=5, epochs=10, lr_decay=2.0,
                      lr_patience=0), out=tmp_path / "r", quiet=True)
    assert [m["step"] for m in metrics(tmp_path / "r")] == [5, 7]
    _, meta = ckpt.read_tensors(tmp_path / "r" / ckpt.STATE)
    assert len(json.loads(meta["trainer"])["valid_history"]) == 1


def test_adam_and_adamw_train(corpus, tmp_path):
    for opt in ("adam", "adamw"):
        r = run_training(tiny(corpus, optimizer=opt, lr=0.01, max_steps=3), out=tmp_path / opt,
                         quiet=True)
        assert r["steps"] == 3


def test_a_run_directory_has_one_writer_at_a_time(corpus, tmp_path):
    run = tmp_path / "run"
    run_training(tiny(corpus, max_steps=2, epochs=2), out=run, quiet=True)
    (run / ckpt.RESULTS).unlink()  # as if it were still training
    (run / f".{ckpt.STATE}.999.tmp").write_bytes(b"half")  # the holder's checkpoint being written
    before = snapshot(run)
    with ckpt.locked(run):  # what a process training into `run` holds
        with pytest.raises(ckpt.RunDirError, match="in use: another lstmlm process is training"):
            run_training(resume=run, overrides={"max_steps": 4}, quiet=True)
        with pytest.raises(ckpt.RunDirError, match="in use"):
            run_training(tiny(corpus), out=run, quiet=True)
        assert snapshot(run) == before  # nothing written, nothing removed
    with ckpt.locked(tmp_path / "tuned"):
        with pytest.raises(ckpt.RunDirError, match="in use"):
            run_finetune(run, out=tmp_path / "tuned", quiet=True)
    assert run_training(resume=run, overrides={"max_steps": 4}, quiet=True)["steps"] == 4


def test_resume_looks_for_the_checkpoint_only_once_it_holds_the_run(corpus, tmp_path,
                                                                    monkeypatch, capsys):
    """A process that held the run may save and stop while a resume starts: the resume must
    continue from that save, not train from step 0 over it."""
    run = tmp_path / "run"
    run_training(tiny(corpus, max_steps=4, eval_interval=2), out=run, quiet=True)
    saved = (run / ckpt.STATE).rename(tmp_path / "saved")
    (run / ckpt.RESULTS).unlink()
    locked = ckpt.locked

    @contextlib.contextmanager
    def the_holder_saves_then_lets_go(run_dir):
        saved.rename(run / ckpt.STATE)
        with locked(run_dir):
            yield

    monkeypatch.setattr(ckpt, "locked", the_holder_saves_then_lets_go)
    results = run_training(resume=run, overrides={"max_steps": 6})
    assert "training from the start" not in capsys.readouterr().err
    assert results["steps"] == 6 and [m["step"] for m in metrics(run)] == [2, 4, 6]


def test_stop_patience_counts_validations_since_the_best(corpus, tmp_path, monkeypatch):
    from lstmlm.train import Trainer

    losses = iter([3.0, 2.0, 2.5, 1.9, 2.0, 2.1, 5.0, 1.0])
    monkeypatch.setattr(Trainer, "evaluate", lambda self, model, data, split: (next(losses), 10))
    results = run_training(tiny(corpus, epochs=100, eval_interval=1, stop_patience=3),
                           out=tmp_path / "run", quiet=True)
    # 2.5 does not beat 2.0, nor do 2.0, 2.1 and 5.0 beat 1.9: the third of those in a row
    # (step 7) stops the run.
    assert results["stop_reason"] == "no_improvement" and results["steps"] == 7
    assert [m["best"] for m in metrics(tmp_path / "run")] == [True, True, False, True, False,
                                                               False, False]
    assert results["best_valid_loss"] == 1.9 and results["test_loss"] == 1.0


def test_stop_patience_survives_a_resume_and_may_be_raised(corpus, tmp_path):
    # An lr far below the weights' rounding: every validation equals the first, none is a new
    # best, so the run stops at the second one after it.
    cfg = tiny(corpus, epochs=100, eval_interval=1, lr=1e-30, stop_patience=2)
    results = run_training(cfg, out=tmp_path / "run", quiet=True)
    assert results["stop_reason"] == "no_improvement" and results["steps"] == 3
    # The count is part of the saved state: two more checks, not four, reach the new patience.
    results = run_training(resume=tmp_path / "run", overrides={"stop_patience": 4}, quiet=True)
    assert results["stop_reason"] == "no_improvement" and results["steps"] == 5
    assert [m["best"] for m in metrics(tmp_path / "run")] == [True] + [False] * 4


@pytest.mark.parametrize("quiet", [False, True])
def test_validation_and_test_show_their_progress_unless_quiet(corpus, tmp_path, monkeypatch,
                                                              quiet):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run_training(tiny(corpus, max_steps=2), out=tmp_path / "run", quiet=quiet)
    shown = terminal.getvalue()
    assert ("epoch 1:" in shown, "valid:" in shown, "test:" in shown) == (not quiet,) * 3
    # The validation's line counts the epochs done: 2 windows of 10 of an epoch's 215 rows.
    assert ("step 2 | epochs 0.09 | valid loss" in shown) == (not quiet)
    assert ("parameters | on cpu (1 thread), fp32 | run directory" in shown) == (not quiet)


def test_two_new_runs_in_one_folder_are_refused(corpus, tmp_path):
    with ckpt.locked(tmp_path / "new"):  # created, locked, not yet holding a config
        with pytest.raises(ckpt.RunDirError, match="in use"):
            run_training(tiny(corpus), out=tmp_path / "new", quiet=True)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [ckpt.LOCK]


def test_a_file_system_without_locks_still_trains(corpus, tmp_path, monkeypatch):
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert run_training(tiny(corpus, max_steps=2), out=tmp_path / "run", quiet=True)["steps"] == 2


def test_training_runs_in_a_thread_other_than_the_main_one(corpus, tmp_path):
    results = []
    worker = threading.Thread(target=lambda: results.append(
        run_training(tiny(corpus, max_steps=3), out=tmp_path / "run", quiet=True)))
    worker.start()
    worker.join()
    assert results and results[0]["steps"] == 3  # Python refuses signal handlers there


def test_resume_refuses_other_changes(corpus, tmp_path):
    run_training(tiny(corpus, max_steps=2), out=tmp_path / "run", quiet=True)
    with pytest.raises(ConfigError, match="cannot change hidden_size"):
        run_training(resume=tmp_path / "run", overrides={"hidden_size": 64}, quiet=True)


def test_min_count_sets_the_runs_vocabulary_and_stays_on_resume(corpus, tmp_path):
    with open(corpus / "train.txt", "a") as f:
        f.write(" zebra yak \n")
    run_training(tiny(corpus, max_steps=2, min_count=2), out=tmp_path / "run", quiet=True)
    words = (tmp_path / "run" / ckpt.VOCAB).read_text().split("\n")[:-1]
    assert "zebra" not in words and "yak" not in words and "cat" in words and "<unk>" in words
    assert run_training(resume=tmp_path / "run", overrides={"max_steps": 3},
                        quiet=True)["steps"] == 3
    with pytest.raises(ConfigError, match="cannot change min_count"):
        run_training(resume=tmp_path / "run", overrides={"min_count": 1}, quiet=True)


def test_max_vocab_sets_the_runs_vocabulary_and_stays_on_resume(corpus, tmp_path):
    run_training(tiny(corpus, max_steps=2, max_vocab=5), out=tmp_path / "run", quiet=True)
    words = (tmp_path / "run" / ckpt.VOCAB).read_text().split("\n")[:-1]
    assert len(words) == 5 and "<unk>" in words and "<eos>" in words
    lm = lstmlm.load(tmp_path / "run")
    assert lm.model.embedding.num_embeddings == len(lm.vocab) == 5
    with pytest.warns(UserWarning, match="zebra"):  # words left out are read as <unk>
        assert math.isfinite(lm.perplexity("a zebra"))
    assert run_training(resume=tmp_path / "run", overrides={"max_steps": 3},
                        quiet=True)["steps"] == 3
    with pytest.raises(ConfigError, match="cannot change max_vocab"):
        run_training(resume=tmp_path / "run", overrides={"max_vocab": 0}, quiet=True)


def test_resume_finds_moved_data_but_refuses_other_data(corpus, tmp_path):
    run_training(tiny(corpus, max_steps=4), out=tmp_path / "run", quiet=True)
    moved = corpus.rename(tmp_path / "moved")
    with pytest.raises(LstmlmError, match="no such file or directory"):
        run_training(resume=tmp_path / "run", quiet=True)
    # The same words, fewer lines: the vocabulary matches, the number of training tokens not.
    shorter = tmp_path / "shorter"
    shutil.copytree(moved, shorter)
    (shorter / "train.txt").write_text("".join(f" {s} \n" for s in SENTENCES * 2))
    with pytest.raises(ckpt.RunDirError, match="has 58 training tokens, but the run was "
                                               "trained on 870: not the same data"):
        run_training(resume=tmp_path / "run", overrides={"data": str(shorter)}, quiet=True)
    results = run_training(resume=tmp_path / "run", overrides={"data": str(moved),
                                                               "max_steps": 6}, quiet=True)
    assert results["steps"] == 6
    assert ckpt.read_run_config(tmp_path / "run")[0].data == str(moved)


def test_a_data_directory_is_recorded_as_an_absolute_path(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    run_training(tiny(corpus, data=corpus.name, max_steps=2), out=tmp_path / "run", quiet=True)
    monkeypatch.chdir(tmp_path / "run")  # elsewhere: the run still finds its data
    assert ckpt.read_run_config(tmp_path / "run")[0].data == str(corpus.resolve())
    assert run_training(resume=tmp_path / "run", overrides={"max_steps": 3},
                        quiet=True)["steps"] == 3


def test_a_dataset_name_is_still_the_dataset_beside_a_folder_of_that_name(corpus, tmp_path,
                                                                          monkeypatch):
    from lstmlm.cli import main

    shutil.copytree(corpus, tmp_path / "datasets" / "ptb")
    monkeypatch.setenv("LSTMLM_DATA", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)
    run_training(tiny(corpus, data="ptb", max_steps=2), out=Path("ptb"), quiet=True)
    # ./ptb is now the run directory; the recorded name still means the dataset.
    assert ckpt.read_run_config(tmp_path / "ptb")[0].data == "ptb"
    assert run_training(resume=Path("ptb"), overrides={"max_steps": 3}, quiet=True)["steps"] == 3
    assert run_training(resume=Path("ptb"), overrides={"max_steps": 4, "data": "ptb"},
                        quiet=True)["steps"] == 4
    assert ckpt.read_run_config(tmp_path / "ptb")[0].data == "ptb"
    assert main(["evaluate", "ptb", "--split", "valid"]) == 0


def test_existing_run_is_not_overwritten(corpus, tmp_path):
    run_training(tiny(corpus, max_steps=2), out=tmp_path / "run", quiet=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(LstmlmError, match="already holds a run"):
        run_training(tiny(corpus, max_steps=2), out=tmp_path / "run", quiet=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_bptt_longer_than_the_data(corpus, tmp_path):
    with pytest.raises(ConfigError, match="bptt 5000 is longer"):
        run_training(tiny(corpus, bptt=5000), out=tmp_path / "run", quiet=True)


def test_a_signal_takes_effect_at_the_next_tick(corpus, tmp_path):
    # The handler only marks the signal pending; the clock's tick makes it the stop signal, so
    # that under DDP (where the tick reduces it over the ranks) all ranks stop after one step.
    from lstmlm.data import load_corpus
    from lstmlm.train import Trainer, _StopOnSignal

    trainer = Trainer(tiny(corpus), load_corpus(corpus), tmp_path / "run", quiet=True)
    trainer.clock = time.monotonic()
    with _StopOnSignal(trainer):
        signal.raise_signal(signal.SIGTERM)
        assert trainer.pending_signal == "SIGTERM" and trainer.stop_reason() is None
        trainer.tick()
        assert trainer.stop_reason() == "interrupted" and trainer.stop_signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait
            signal.raise_signal(signal.SIGINT)


def test_sigint_saves_and_resume_continues_mid_epoch(corpus, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstmlm", "train", "--data", str(corpus), "--out", str(run),
         "--embedding-size", "24", "--hidden-size", "32", "--num-layers", "1",
         "--batch-size", "2", "--bptt", "5", "--epochs", "1000", "--lr", "1.0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 60
    while not (run / ckpt.METRICS).exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # wait until the first epoch has been validated
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "--resume" in err and "Traceback" not in err
    tensors, meta = ckpt.read_tensors(run / ckpt.STATE)
    state = json.loads(meta["trainer"])
    assert state["step"] > 0
    results = run_training(resume=run, overrides={"max_steps": state["step"] + 3}, quiet=True)
    assert results["steps"] == state["step"] + 3


def test_checkpoint_round_trip_gives_identical_logits(corpus, tmp_path):
    run = tmp_path / "run"
    run_training(tiny(corpus, max_steps=3), out=run, quiet=True)
    _, _, model = ckpt.load_run(run)
    weights, _ = ckpt.read_tensors(run / ckpt.WEIGHTS)
    tokens = torch.randint(0, 10, (6, 2))
    _, _, again = ckpt.load_run(run)
    a, _ = model(tokens, model.init_hidden(2))
    b, _ = again(tokens, again.init_hidden(2))
    assert torch.equal(a, b)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


AWD = dict(variational_dropout=True, dropout_input=0.3, dropout_hidden=0.2, dropout_output=0.3,
           dropout_embedding=0.1, weight_drop=0.3, variable_bptt=True, ar_alpha=2.0, tar_beta=1.0,
           num_layers=2, last_hidden_size=24, tie_weights=True, ntasgd=True, nonmono=1,
           lr_decay=1.0)


def test_variable_bptt_lengths():
    from lstmlm.train import sample_seq_len

    torch.manual_seed(0)
    cfg = Config(bptt=70, variable_bptt=True, bptt_max_extra=10)
    lengths = torch.tensor([sample_seq_len(cfg) for _ in range(4000)])
    assert lengths.min() >= 5 and lengths.max() <= 80
    short = (lengths < 50).float().mean().item()  # the bptt/2 branch, N(35, 5)
    assert 0.03 < short < 0.07
    assert abs(lengths[lengths >= 50].float().mean().item() - 70) < 1.0
    assert sample_seq_len(Config(bptt=70)) == 70


def test_variable_bptt_scales_the_step_lr(corpus, tmp_path):
    from lstmlm.data import load_corpus
    from lstmlm.train import Trainer

    cfg = tiny(corpus, variable_bptt=True, weight_decay=0.0, lr=0.5)
    trainer = Trainer(cfg, load_corpus(corpus), tmp_path / "run", quiet=True)
    param = trainer.model.decoder.bias
    before = param.detach().clone()
    for p in trainer.model.parameters():
        p.grad = torch.ones_like(p)
    trainer.step_optimizer(seq_len=15)  # bptt is 10: lr 0.5 * 15/10
    assert torch.allclose(before - param.detach(), torch.full_like(param, 0.75))
    assert trainer.base_lr == 0.5  # the scaling lasts one step


def test_ntasgd_switches_and_validates_the_average(corpus, tmp_path):
    run = tmp_path / "run"
    results = run_training(tiny(corpus, **AWD, epochs=3, eval_interval=3, lr=30.0, clip=0.0),
                           out=run, quiet=True)
    assert results["averaging_since_step"] > 0
    tensors, meta = ckpt.read_tensors(run / ckpt.STATE)
    assert int(meta["avg_count"]) == results["steps"] - results["averaging_since_step"]
    # model.safetensors holds averaged weights, which differ from the last SGD iterate.
    best, _ = ckpt.read_tensors(run / ckpt.WEIGHTS)
    assert not torch.equal(best["decoder.bias"], tensors["model.decoder.bias"])


@pytest.mark.parametrize("after_switch", [2, 4])  # stops between validations (every 3 steps)
def test_resume_is_exact_with_every_awd_technique(corpus, tmp_path, after_switch):
    cfg = dict(AWD, epochs=2, eval_interval=3, lr=30.0, clip=0.0)
    straight = run_training(tiny(corpus, **cfg), out=tmp_path / "a", quiet=True)
    # The stop comes after the switch to averaging, wherever the trajectory puts it.
    stop_at = straight["averaging_since_step"] + after_switch
    assert 0 < straight["averaging_since_step"] and stop_at < straight["steps"]
    run_training(tiny(corpus, max_steps=stop_at, **cfg), out=tmp_path / "b", quiet=True)
    resumed = run_training(resume=tmp_path / "b", overrides={"max_steps": 0}, quiet=True)
    assert resumed["averaging_since_step"] == straight["averaging_since_step"]
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-6)
    a = {m["step"]: m["valid_loss"] for m in metrics(tmp_path / "a")}
    b = {m["step"]: m["valid_loss"] for m in metrics(tmp_path / "b")}
    assert all(b[s] == pytest.approx(a[s], rel=1e-6) for s in a if s > stop_at)


def test_a_run_leaves_the_callers_config_alone(corpus, tmp_path):
    cfg = tiny(corpus, data=os.path.relpath(corpus), max_steps=2)
    before = dataclasses.asdict(cfg)
    run_training(cfg, out=tmp_path / "a", overrides={"lr": 3.0}, quiet=True)
    assert dataclasses.asdict(cfg) == before
    recorded, _ = ckpt.read_run_config(tmp_path / "a")
    assert recorded.lr == 3.0 and recorded.data == str(Path(corpus).resolve())


def test_finetune_writes_its_own_run(corpus, tmp_path):

    base = tmp_path / "base"
    run_training(tiny(corpus, **AWD, epochs=1, eval_interval=4), out=base, quiet=True)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    results = run_finetune(base, overrides={"epochs": 30, "lr": 10.0}, quiet=True)
    out = tmp_path / "base-finetune"
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before  # base untouched
    assert results["stop_reason"] == "converged"
    assert results["averaging_since_step"] == 0
    cfg, _ = ckpt.read_run_config(out)
    assert cfg.finetune and cfg.epochs == 30
    # Fine-tuning starts from the base model: its first validation is near the base's best.
    first = metrics(out)[0]["valid_loss"]
    assert first < json.loads((base / ckpt.RESULTS).read_text())["best_valid_loss"] * 1.5


def test_finetune_that_never_beats_the_base_keeps_the_base_weights(corpus, tmp_path):

    base = tmp_path / "base"
    run_training(tiny(corpus, **AWD, epochs=1, eval_interval=4), out=base, quiet=True)
    base_best = json.loads((base / ckpt.RESULTS).read_text())["best_valid_loss"]
    results = run_finetune(base, overrides={"lr": 1000.0, "max_steps": 4, "eval_interval": 2},
                           quiet=True)
    out = tmp_path / "base-finetune"
    assert all(m["valid_loss"] > base_best and not m["best"] for m in metrics(out))
    assert results["best_valid_loss"] == pytest.approx(base_best, rel=1e-6)
    kept, _ = ckpt.read_tensors(out / ckpt.WEIGHTS)
    base_weights, _ = ckpt.read_tensors(base / ckpt.WEIGHTS)
    assert kept.keys() == base_weights.keys()
    assert all(torch.equal(kept[name], base_weights[name]) for name in kept)


def test_finetune_refuses_another_model_shape_before_it_loads_anything(corpus, tmp_path):
    base = tmp_path / "base"
    run_training(tiny(corpus, max_steps=2), out=base, quiet=True)
    with pytest.raises(ConfigError, match="shape cannot change: drop hidden_size, num_layers$"):
        run_finetune(base, overrides={"hidden_size": 64, "num_layers": 2, "lr": 1.0},
                     quiet=True)
    # Said before the checks of the settings together (tying needs equal sizes).
    with pytest.raises(ConfigError, match="shape cannot change: drop embedding_size, tie_weights"):
        run_finetune(base, overrides={"embedding_size": 64, "tie_weights": True}, quiet=True)
    assert not (tmp_path / "base-finetune").exists()
    # The same values as the base are no change, nor is a last layer of the size 0 meant.
    assert run_finetune(base, overrides={"hidden_size": 32, "last_hidden_size": 32,
                                         "max_steps": 2}, quiet=True)["steps"] == 2


def test_finetune_is_only_for_lstmlm_finetune(corpus, tmp_path):
    with pytest.raises(ConfigError, match="finetune is set by `lstmlm finetune RUN`"):
        run_training(tiny(corpus, finetune=True, max_steps=2), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_finetune_of_an_adam_run_asks_for_sgd_and_averages_from_its_first_step(corpus, tmp_path):

    base = tmp_path / "base"
    run_training(tiny(corpus, optimizer="adam", lr=0.01, average_from=0.5, max_steps=10), out=base,
                 quiet=True)
    with pytest.raises(ConfigError, match="trained with adam.*pass --set optimizer=sgd"):
        run_finetune(base, quiet=True)
    with pytest.raises(ConfigError, match="lstmlm finetune always fine-tunes"):
        run_finetune(base, overrides={"finetune": False, "optimizer": "sgd"}, quiet=True)
    results = run_finetune(base, overrides={"optimizer": "sgd", "lr": 1.0}, quiet=True)
    cfg, _ = ckpt.read_run_config(tmp_path / "base-finetune")
    assert cfg.optimizer == "sgd" and cfg.average_from == 0 and cfg.finetune
    assert results["averaging_since_step"] == 0


def test_finetune_that_crashed_before_its_first_check_resumes_from_the_base(corpus, tmp_path,
                                                                           monkeypatch):
    from lstmlm.train import Trainer, run_finetune

    base = tmp_path / "base"
    run_training(tiny(corpus, **AWD, epochs=1, eval_interval=4), out=base, quiet=True)
    finetune = {"epochs": 30, "lr": 10.0, "max_steps": 40}
    straight = run_finetune(base, tmp_path / "straight", finetune, quiet=True)

    def crash(self, bar):
        raise OSError("the machine went down")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "advance", crash)
        with pytest.raises(OSError):
            run_finetune(base, tmp_path / "crashed", finetune, quiet=True)
    resumed = run_training(resume=tmp_path / "crashed", quiet=True)
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-6)
    assert resumed["steps"] == straight["steps"]
    # Without its step-0 checkpoint the starting weights are gone: refuse, do not start anew.
    (tmp_path / "crashed" / ckpt.STATE).unlink()
    with pytest.raises(ckpt.RunDirError, match="no checkpoint.*`lstmlm finetune` on the base run"):
        run_training(resume=tmp_path / "crashed", quiet=True)


@pytest.fixture
def other_corpus(tmp_path):
    """Text that shares most of `corpus`'s words and adds some (bird, flew, over)."""
    d = tmp_path / "other"
    d.mkdir()
    lines = SENTENCES[:2] + ["the bird flew over the red house"]
    for split, repeats in (("train", 30), ("valid", 3), ("test", 3)):
        (d / f"{split}.txt").write_text("".join(f"{s}\n" for s in lines * repeats))
    return d


def test_init_from_starts_on_other_data_from_a_runs_weights(corpus, other_corpus, tmp_path):
    base = tmp_path / "base"
    run_training(tiny(corpus, epochs=8, lr=0.02, optimizer="adam"), out=base, quiet=True)
    before = snapshot(base)
    new = tiny(other_corpus, lr=0.02, optimizer="adam", max_steps=2, eval_interval=2)
    scratch = run_training(new, out=tmp_path / "scratch", quiet=True)
    started = run_training(new, out=tmp_path / "new", overrides={"init_from": str(base)},
                           quiet=True)
    assert snapshot(base) == before
    cfg, _ = ckpt.read_run_config(tmp_path / "new")
    assert cfg.init_from == str(base.resolve()) and cfg.data == str(other_corpus)
    # Two steps from the trained weights know most of the words' order; two from scratch do not.
    assert started["best_valid_loss"] < scratch["best_valid_loss"] / 2
    # With a learning rate that only does harm, the run keeps (and tests) its starting
    # weights: they were validated first and count as the best so far.
    harmed = run_training(new, out=tmp_path / "harmed", quiet=True,
                          overrides={"init_from": str(base), "lr": 50.0, "optimizer": "sgd"})
    assert all(not m["best"] for m in metrics(tmp_path / "harmed"))
    kept, _ = ckpt.read_tensors(tmp_path / "harmed" / ckpt.WEIGHTS)
    trained, _ = ckpt.read_tensors(base / ckpt.WEIGHTS)
    assert torch.equal(kept["layers.0.weight_hh_l0"], trained["layers.0.weight_hh_l0"])
    assert harmed["best_valid_loss"] < started["best_valid_loss"] * 3


def test_init_from_resumes_from_its_starting_weights(corpus, other_corpus, tmp_path,
                                                    monkeypatch):
    from lstmlm.train import Trainer

    base = tmp_path / "base"
    run_training(tiny(corpus, max_steps=10), out=base, quiet=True)
    new = tiny(other_corpus, init_from=str(base), max_steps=6, eval_interval=3)
    straight = run_training(new, out=tmp_path / "straight", quiet=True)

    def crash(self, bar):
        raise OSError("the machine went down")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "advance", crash)
        with pytest.raises(OSError):
            run_training(new, out=tmp_path / "crashed", quiet=True)
    resumed = run_training(resume=tmp_path / "crashed", quiet=True)
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-6)
    (tmp_path / "crashed" / ckpt.STATE).unlink()
    with pytest.raises(ckpt.RunDirError, match="no checkpoint.*run the same command again"):
        run_training(resume=tmp_path / "crashed", quiet=True)


def test_init_from_refuses_another_shape_a_missing_run_and_finetune(corpus, other_corpus,
                                                                     tmp_path):
    base = tmp_path / "base"
    run_training(tiny(corpus, max_steps=2), out=base, quiet=True)
    with pytest.raises(ConfigError, match=r"shape must be that run's \(embedding_size 24 "
                                          r"there, 16 here, hidden_size 32 there, 16 here, "
                                          r"last_hidden_size 32 there, 16 here, tie_weights "
                                          r"False there, True here\); leave out --preset"):
        run_training(tiny(other_corpus, init_from=str(base), hidden_size=16, embedding_size=16,
                          tie_weights=True), out=tmp_path / "new", quiet=True)
    with pytest.raises(ckpt.RunDirError, match="nope: no such run directory"):
        run_training(tiny(other_corpus, init_from=str(tmp_path / "nope")), out=tmp_path / "new",
                     quiet=True)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="lstmlm finetune starts from .*; drop --init-from"):
        run_finetune(base, overrides={"init_from": str(base)}, quiet=True)


def decoder_bias_after_each_step(monkeypatch) -> list[torch.Tensor]:
    """The decoder's bias after every optimizer step of the runs that follow."""
    from lstmlm.train import Trainer

    snapshots = []
    step_optimizer = Trainer.step_optimizer

    def record(self, seq_len):
        step_optimizer(self, seq_len)
        snapshots.append(self.model.decoder.bias.detach().clone())

    monkeypatch.setattr(Trainer, "step_optimizer", record)
    return snapshots


def test_ntasgd_average_on_scripted_validation_losses(corpus, tmp_path, monkeypatch):
    """Validation losses are scripted so the trigger fires at a known check; the saved average
    must equal the hand-computed mean of the weights after every step since the switch."""
    from lstmlm import train as train_module

    scripted = iter([5.0, 4.0, 4.5, 4.2, 3.9, 4.1, 4.3, 4.4])
    monkeypatch.setattr(train_module, "evaluate", lambda *args: (next(scripted, 4.0), 1))
    snapshots = decoder_bias_after_each_step(monkeypatch)
    cfg = tiny(corpus, ntasgd=True, nonmono=2, eval_interval=2, max_steps=16, lr_decay=1.0,
               dropout_output=0.3)
    results = run_training(cfg, out=tmp_path / "run", quiet=True)
    # Checks i = 0..7 at steps 2, 4, ..., 16. With nonmono 2, check i compares with the best of
    # checks 0..i-3: check 3 (4.2) with 5.0, check 4 (3.9) with 4.0, check 5 (4.1, step 12)
    # with 4.0 -> worse: averaging covers the weights after steps 13, 14, 15, 16.
    assert results["averaging_since_step"] == 12
    tensors, meta = ckpt.read_tensors(tmp_path / "run" / ckpt.STATE)
    expected = torch.stack(snapshots[12:]).mean(0)
    assert int(meta["avg_count"]) == 4
    assert torch.allclose(tensors["avg.decoder.bias"], expected, atol=1e-6)


def test_average_from_averages_the_last_part_of_the_run_with_adam(corpus, tmp_path, monkeypatch):
    """average_from=0.75 of 16 steps: the weights after steps 13-16 are averaged, and that
    average is what the run validates and saves as its best weights."""
    snapshots = decoder_bias_after_each_step(monkeypatch)
    cfg = tiny(corpus, optimizer="adam", lr=0.01, average_from=0.75, max_steps=16, epochs=100,
               eval_interval=8, lr_schedule="cosine")
    results = run_training(cfg, out=tmp_path / "run", quiet=True)
    assert results["averaging_since_step"] == 12 and results["steps"] == 16
    expected = torch.stack(snapshots[12:]).mean(0)
    tensors, meta = ckpt.read_tensors(tmp_path / "run" / ckpt.STATE)
    assert int(meta["avg_count"]) == 4
    assert torch.allclose(tensors["avg.decoder.bias"], expected, atol=1e-6)
    assert not torch.allclose(expected, snapshots[-1], atol=1e-6)  # the average is not the last
    assert metrics(tmp_path / "run")[-1]["best"]  # the average validated best: it is the model
    best = ckpt.read_tensors(tmp_path / "run" / ckpt.WEIGHTS)[0]["decoder.bias"]
    assert torch.allclose(best, expected, atol=1e-6)


def test_gradient_clipping_bounds_the_global_norm(corpus, tmp_path):
    from lstmlm.data import load_corpus
    from lstmlm.train import Trainer

    trainer = Trainer(tiny(corpus, clip=0.01, lr=1.0), load_corpus(corpus), tmp_path / "run",
                      quiet=True)
    trainer.train_step()
    norm = torch.norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
    assert norm <= 0.01 + 1e-6
    unclipped = Trainer(tiny(corpus, clip=0.0, lr=1.0), load_corpus(corpus), tmp_path / "r2",
                        quiet=True)
    unclipped.train_step()
    assert torch.norm(torch.stack([p.grad.norm() for p in unclipped.model.parameters()])) > 0.01
