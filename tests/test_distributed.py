"""Data-parallel training with torchrun: 2 CPU processes (gloo) against 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lstmlm import checkpoint as ckpt
from lstmlm.config import Config
from lstmlm.distributed import Group, columns, mask_seed
from lstmlm.train import run_training
from tests.helpers import metrics

TINY = dict(embedding_size=16, hidden_size=24, num_layers=2, batch_size=4, bptt=8,
            valid_batch_size=2, test_batch_size=1, lr=5.0, clip=0.5, epochs=1000, seed=5)
# Every AWD technique whose draws concern the whole batch, and no per-stream dropout: 2 ranks
# must then follow the single process exactly.
NO_STREAM_DROPOUT = dict(TINY, dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0,
                         weight_drop=0.5, dropout_embedding=0.1, variable_bptt=True,
                         ar_alpha=2.0, tar_beta=1.0, ntasgd=True, nonmono=2, eval_interval=3,
                         tie_weights=True, hidden_size=16)
AWD = dict(TINY, variational_dropout=True, dropout_input=0.3, dropout_hidden=0.2,
           dropout_output=0.3, weight_drop=0.3, eval_interval=5)


def flags(values: dict) -> list[str]:
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={str(v).lower()}")]


def torchrun(*args, nproc=2):
    """`torchrun --nproc_per_node N -m lstmlm ARGS` on gloo; fails the test on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "lstmlm", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_ranks_follow_one_process(tiny_corpus, tmp_path):
    cfg = dict(NO_STREAM_DROPOUT, data=str(tiny_corpus), max_steps=30)
    single = run_training(Config(**cfg), out=tmp_path / "one", quiet=True)
    proc = torchrun("train", "--out", tmp_path / "two", *flags(cfg))
    double = json.loads(proc.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [m["step"] for m in one] and len(one) == 10
    for key in ("train_loss", "valid_loss", "lr"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-5), key
    assert double["averaging_since_step"] == single["averaging_since_step"] > 0  # NT-ASGD
    for key in ("test_loss", "best_valid_loss"):
        assert double[key] == pytest.approx(single[key], rel=1e-5)
    assert double["test_tokens"] == single["test_tokens"] and double["steps"] == 30
    assert double["train_tokens"] == single["train_tokens"]


def test_two_ranks_start_from_a_trained_run_as_one_process_does(tiny_corpus, tmp_path):
    cfg = dict(NO_STREAM_DROPOUT, data=str(tiny_corpus), max_steps=6)
    run_training(Config(**cfg), out=tmp_path / "base", quiet=True)
    single = run_training(Config(**cfg, init_from=str(tmp_path / "base")), out=tmp_path / "one",
                          quiet=True)
    proc = torchrun("train", "--out", tmp_path / "two", "--init-from", tmp_path / "base",
                    *flags(cfg))
    double = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [m["valid_loss"] for m in metrics(tmp_path / "two")] == pytest.approx(
        [m["valid_loss"] for m in metrics(tmp_path / "one")], rel=1e-5)
    for key in ("test_loss", "best_valid_loss"):
        assert double[key] == pytest.approx(single[key], rel=1e-5)


def test_awd_training_checkpoints_once_and_resumes_exactly(tiny_corpus, tmp_path):
    cfg = flags(dict(AWD, data=str(tiny_corpus)))
    torchrun("train", "--out", tmp_path / "whole", "--max-steps", 20, *cfg)
    torchrun("train", "--out", tmp_path / "split", "--max-steps", 10, *cfg)
    assert [m["step"] for m in metrics(tmp_path / "split")] == [5, 10]  # one line each
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == sorted(
        [ckpt.CONFIG, ckpt.VOCAB, ckpt.WEIGHTS, ckpt.STATE, ckpt.METRICS, ckpt.RESULTS,
         ckpt.LOCK])
    torchrun("train", "--resume", tmp_path / "split", "--max-steps", 20)
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [m["step"] for m in split] == [5, 10, 15, 20]
    for key in ("train_loss", "valid_loss"):
        assert [m[key] for m in split] == pytest.approx([m[key] for m in whole], rel=1e-6)
    # The hidden state of both ranks' streams is saved, so one process can resume it too.
    tensors, _ = ckpt.read_tensors(tmp_path / "split" / ckpt.STATE)
    assert tensors["hidden.0.h"].shape[1] == AWD["batch_size"]
    results = run_training(resume=tmp_path / "split", overrides={"max_steps": 25}, quiet=True)
    assert results["steps"] == 25


def test_ranks_draw_their_own_stream_masks():
    seeds = {mask_seed(1111, rank, step) for rank in range(4) for step in range(1000)}
    assert len(seeds) == 4000
    for seed in (-2**63, 2**64 - 1):  # the config's extremes
        torch.Generator().manual_seed(mask_seed(seed, 3, 10**6))


def test_columns_split_streams_across_ranks():
    data = torch.arange(30).view(3, 10)
    parts = [columns(data, Group(rank, 4)) for rank in range(4)]
    assert torch.equal(torch.cat(parts, dim=1), data)
    assert [p.size(1) for p in parts] == [3, 3, 2, 2]
    assert columns(data[:, :1], Group(1, 2)).size(1) == 0  # more ranks than streams


def test_batch_that_does_not_split_is_refused(tiny_corpus, tmp_path):
    cfg = dict(TINY, data=str(tiny_corpus), batch_size=3, max_steps=2)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lstmlm", "train", "--out", str(tmp_path / "run"), *flags(cfg)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode != 0
    assert "batch_size 3 does not split evenly over 2 processes" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "lstmlm: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("lstmlm: error: ")  # rank 0's, whole


def test_a_run_in_use_stops_every_rank_with_rank_0s_one_line(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    run_training(Config(**dict(TINY, data=str(tiny_corpus), max_steps=2)), out=run, quiet=True)
    with ckpt.locked(run):  # another process trains into it
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "lstmlm", "train", "--resume", str(run), "--max-steps", "4"],
            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
            timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "lstmlm: error:" in line]
    assert errors == [f"lstmlm: error: {run} is in use: another lstmlm process is training into "
                      "it; let it finish or stop it (Ctrl-C saves a checkpoint), or choose "
                      "another --out"]
    assert "[rank1]" not in proc.stderr  # rank 1 stopped too, without a traceback of its own


def children(pid: int) -> list[int]:
    kids = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(stat))
    return kids


def rank_of(pid: int) -> int | None:
    """The RANK a worker was started with; None for a process that has gone or is no worker."""
    try:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_a_signal_to_one_rank_stops_all_and_resume_finishes(tiny_corpus, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lstmlm", "train", "--out", str(run), "--checkpoint-steps", "20",
         *flags(dict(TINY, data=str(tiny_corpus)))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (run / ckpt.STATE).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run / ckpt.STATE).exists()
    rank1 = next(pid for pid in children(agent.pid) if rank_of(pid) == 1)
    os.kill(rank1, signal.SIGTERM)
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err[-3000:]
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["stop_reason"] == "interrupted" and stopped["steps"] > 0
    step = json.loads(ckpt.read_tensors(run / ckpt.STATE)[1]["trainer"])["step"]
    assert step == stopped["steps"]  # rank 0 saved where both stopped
    torchrun("train", "--resume", run, "--max-steps", step + 10)
    assert json.loads((run / ckpt.RESULTS).read_text())["steps"] == step + 10
