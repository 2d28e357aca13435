"""`lstmlm ablate`: plans, one budget for all runs, resuming after Ctrl-C, failed runs, report."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lstmlm import checkpoint as ckpt
from lstmlm.ablate import PlanError, load_plan
from lstmlm.cli import main
from lstmlm.report import COLUMNS, UNLIMITED_EPOCHS

TINY = {"embedding_size": 16, "hidden_size": 16, "num_layers": 1, "batch_size": 4, "bptt": 8,
        "valid_batch_size": 2, "test_batch_size": 2, "lr": 1.0}
AWD = {"weight_drop": 0.3, "variational_dropout": True, "tie_weights": True, "ar_alpha": 1.0}


def write_toml(path: Path, values: dict) -> Path:
    def value(v):
        return str(v).lower() if isinstance(v, bool) else json.dumps(v)
    path.write_text("".join(f"{k} = {value(v)}\n" for k, v in values.items()))
    return path


@pytest.fixture
def plan(tmp_path):
    """A plan of three tiny runs: a baseline (the reference), AWD techniques, a wider model."""
    write_toml(tmp_path / "tiny.toml", TINY)
    write_toml(tmp_path / "tiny-awd.toml", {**TINY, **AWD})
    path = tmp_path / "plan.toml"
    path.write_text('reference = "base"\n'
                    '[[run]]\npreset = "tiny.toml"\nname = "base"\n'
                    '[[run]]\npreset = "tiny-awd.toml"\nname = "awd"\n'
                    '[[run]]\npreset = "tiny.toml"\nname = "wide"\nset = {hidden_size = 24}\n')
    return path


def ablate(capsys, plan, data, out, *extra):
    code = main(["ablate", "--plan", str(plan), "--data", str(data), "--out", str(out),
                 "--max-steps", "12", "--set", "eval_interval=4", *map(str, extra)])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / ckpt.METRICS).read_text().splitlines()]


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.stat().st_size > 10_000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 400 and height > 300


def test_plan_runs_end_to_end(plan, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = ablate(capsys, plan, tiny_corpus, out)
    assert code == 0, stderr
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(COLUMNS)
    assert [r["name"] for r in rows] == ["base", "awd", "wide"]
    assert [r["preset"] for r in rows] == ["tiny", "tiny-awd", "tiny"]
    assert all(r["status"] == "budget" and r["stop_reason"] == "max_steps" for r in rows)
    assert all(int(r["steps"]) == 12 and float(r["test_ppl"]) > 1 for r in rows)
    assert float(rows[0]["delta_test_ppl"]) == 0.0
    assert float(rows[1]["delta_test_ppl"]) == pytest.approx(
        float(rows[1]["test_ppl"]) - float(rows[0]["test_ppl"]))
    assert rows[0]["techniques"] == "weight decay"
    assert rows[1]["techniques"] == ("weight drop; variational dropout; weight tying; AR/TAR; "
                                     "weight decay")
    assert int(rows[2]["parameters"]) > int(rows[0]["parameters"])
    # Every run is an ordinary run directory, trained with the plan's budget and seed.
    for name in ("base", "awd", "wide"):
        cfg, _, _ = ckpt.load_run(out / name)
        assert (cfg.max_steps, cfg.epochs, cfg.max_minutes, cfg.seed) == (
            12, UNLIMITED_EPOCHS, 0.0, 1111)
        assert steps(out / name) == [4, 8, 12]
    assert ckpt.read_run_config(out / "wide")[0].hidden_size == 24
    markdown = (out / "results.md").read_text()
    assert stdout == markdown
    assert f"Corpus **{tiny_corpus.name}**, budget **12 steps per run, seed 1111**" in markdown
    assert "| base | tiny | weight decay |" in markdown and "0.00 (ref)" in markdown
    assert_png(out / "curves.png")
    assert_png(out / "ablation.png")
    status = json.loads((out / "plan-status.json").read_text())
    assert [r["status"] for r in status["runs"]] == ["budget"] * 3


@pytest.mark.parametrize("twice", [False, True])  # one Ctrl-C saves; a second stops at once
def test_interrupted_plan_resumes_where_it_stopped(plan, tiny_corpus, tmp_path, capsys,
                                                   monkeypatch, twice):
    from lstmlm.train import Trainer

    stop_reason = Trainer.stop_reason
    interrupted = []

    def ctrl_c_in_second_run(self):  # as if Ctrl-C came at step 6 of "awd"
        if self.run_dir.name == "awd" and self.state.step == 6 and not interrupted:
            interrupted.append(True)
            if twice:
                raise KeyboardInterrupt  # the last checkpoint (step 4) is resumed
            self.stop_signal = "SIGINT"
        return stop_reason(self)

    monkeypatch.setattr(Trainer, "stop_reason", ctrl_c_in_second_run)
    out = tmp_path / "out"
    code, _, stderr = ablate(capsys, plan, tiny_corpus, out)
    assert code == 0 and "interrupted during awd" in stderr
    assert "rerun the same command" in stderr
    status = json.loads((out / "plan-status.json").read_text())
    assert [r["status"] for r in status["runs"]] == ["budget", "interrupted", "pending"]
    assert not (out / "awd" / ckpt.RESULTS).exists() and (out / "awd" / ckpt.STATE).exists()
    assert not (out / "wide").exists()
    assert [r["status"] for r in read_csv(out / "results.csv")] == (
        ["budget", "pending", "pending"] if twice else ["budget", "interrupted", "pending"])
    first = out / "base" / ckpt.RESULTS
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    awd_first_metrics = (out / "awd" / ckpt.METRICS).read_text()

    code, _, stderr = ablate(capsys, plan, tiny_corpus, out)
    assert code == 0, stderr
    assert "base: finished earlier, skipped" in stderr and "awd: resuming" in stderr
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # not retrained
    assert steps(out / "awd") == [4, 8, 12]  # continued, not restarted
    assert (out / "awd" / ckpt.METRICS).read_text().startswith(awd_first_metrics)
    rows = read_csv(out / "results.csv")
    assert [(r["status"], r["steps"]) for r in rows] == [("budget", "12")] * 3

    # Rerun with other settings or another budget: refused before anything trains, so the
    # finished runs are neither retrained nor compared with runs of other settings.
    for extra, changed in ((["--set", "dropout_output=0.5"], "dropout_output"),
                           (["--max-steps", "16"], "max_steps"),
                           (["--set", "stop_patience=3"], "stop_patience")):
        code, _, stderr = ablate(capsys, plan, tiny_corpus, out, *extra)
        assert code == 1 and stderr.count("\n") == 1
        assert f"holds a run with other settings ({changed})" in stderr
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["budget"] * 3
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before


def test_a_run_stopped_before_its_first_checkpoint_starts_again(plan, tiny_corpus, tmp_path,
                                                                capsys, monkeypatch):
    from lstmlm.train import Trainer

    advance = Trainer.advance

    def second_ctrl_c_at_step_2_of_awd(self, bar):  # its first checkpoint would be at step 4
        if self.run_dir.name == "awd" and self.state.step == 2:
            raise KeyboardInterrupt
        advance(self, bar)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "advance", second_ctrl_c_at_step_2_of_awd)
        code, _, stderr = ablate(capsys, plan, tiny_corpus, out)
    assert code == 0 and "interrupted during awd" in stderr
    assert (out / "awd" / ckpt.CONFIG).exists() and not (out / "awd" / ckpt.STATE).exists()
    code, _, stderr = ablate(capsys, plan, tiny_corpus, out)
    assert code == 0 and "awd: starting" in stderr, stderr
    assert [(r["status"], r["steps"]) for r in read_csv(out / "results.csv")] == (
        [("budget", "12")] * 3)
    assert steps(out / "awd") == [4, 8, 12]


@pytest.mark.parametrize("option, message", [
    (["--max-steps", "-5"], "max_steps must be >= 0"),
    (["--dropout-output", "2"], "dropout_output must be in [0, 1)"),
    (["--data", "no-such-corpus"], "--data no-such-corpus: no such file or directory"),
])
def test_a_bad_shared_option_stops_the_plan_before_it_starts(plan, tiny_corpus, tmp_path,
                                                             capsys, option, message):
    code, _, stderr = ablate(capsys, plan, tiny_corpus, tmp_path / "out", *option)
    assert code == 1 and stderr.count("\n") == 1 and message in stderr
    assert not (tmp_path / "out").exists()


def test_a_failing_run_is_recorded_and_the_plan_goes_on(plan, tiny_corpus, tmp_path, capsys):
    write_toml(tmp_path / "too-long.toml", {**TINY, "bptt": 5000})
    text = plan.read_text()
    plan.write_text(text.replace('name = "awd"', 'name = "awd"\n[[run]]\npreset = "too-long.toml"'))
    out = tmp_path / "out"
    code, stdout, stderr = ablate(capsys, plan, tiny_corpus, out)
    assert code == 1  # after the report, so that a script sees it
    assert "too-long failed: bptt 5000 is longer" in stderr
    assert stderr.endswith(f"lstmlm: error: 1 of 4 runs failed (too-long); see "
                           f"{out / 'results.md'}\n")
    rows = {r["name"]: r for r in read_csv(out / "results.csv")}
    assert list(rows) == ["base", "awd", "too-long", "wide"]
    assert rows["too-long"]["status"] == "failed"
    assert rows["too-long"]["error"].startswith("bptt 5000 is longer than each training stream")
    assert rows["too-long"]["test_ppl"] == "" and rows["wide"]["status"] == "budget"
    status = json.loads((out / "plan-status.json").read_text())
    failed = [r for r in status["runs"] if r["status"] == "failed"]
    assert [r["name"] for r in failed] == ["too-long"] and "bptt 5000" in failed[0]["error"]
    assert "- **too-long**: bptt 5000 is longer" in stdout


def test_a_folder_another_ablation_is_using_is_refused(plan, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    with ckpt.locked(out):  # what `lstmlm ablate --out out` holds while it runs
        code, _, stderr = ablate(capsys, plan, tiny_corpus, out)
    assert code == 1 and stderr.count("\n") == 1 and f"{out} is in use" in stderr
    assert sorted(p.name for p in out.iterdir()) == [ckpt.LOCK]  # no run started


def test_sigint_stops_the_whole_plan(plan, tiny_corpus, tmp_path):
    """The real Ctrl-C, in a subprocess: the second run saves its state and the plan stops."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstmlm", "ablate", "--plan", str(plan), "--data",
         str(tiny_corpus), "--out", str(out), "--minutes-per-run", "0.02",
         "--set", "eval_interval=5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300  # generous: a loaded machine imports torch slowly
    while not (out / "awd" / ckpt.METRICS).exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the second run is training
    assert (out / "awd" / ckpt.METRICS).exists(), "the plan's second run never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "rerun the same command" in err and "Traceback" not in err
    assert (out / "base" / ckpt.RESULTS).exists() and not (out / "awd" / ckpt.RESULTS).exists()
    assert (out / "awd" / ckpt.STATE).exists() and not (out / "wide").exists()


def test_data_without_the_splits_stops_the_plan_before_it_starts(plan, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, stderr = ablate(capsys, plan, tmp_path / "empty", tmp_path / "out")
    assert code == 1 and "missing the train split" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_dataset_name_stays_the_dataset_when_the_output_has_its_name(plan, tiny_corpus,
                                                                        tmp_path, capsys,
                                                                        monkeypatch):
    shutil.copytree(tiny_corpus, tmp_path / "datasets" / "ptb")
    monkeypatch.setenv("LSTMLM_DATA", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)
    code, _, stderr = ablate(capsys, plan, "ptb", "ptb")  # ./ptb: the ablation's own folder
    assert code == 0, stderr
    assert ckpt.read_run_config(tmp_path / "ptb" / "base")[0].data == "ptb"


# ---- plans ----------------------------------------------------------------------------------

def test_a_run_is_checked_with_the_options_every_run_shares(tmp_path, tiny_corpus, capsys):
    """Valid only with the shared --embedding-size: the plan alone must not be judged."""
    write_toml(tmp_path / "tied.toml", {**TINY, **AWD})  # 16 and 16: tied
    plan = tmp_path / "plan.toml"
    plan.write_text('[[run]]\npreset = "tied.toml"\nset = {hidden_size = 12}\n')
    code, _, stderr = ablate(capsys, plan, tiny_corpus, tmp_path / "out", "--embedding-size", 12)
    assert code == 0, stderr
    code, _, stderr = ablate(capsys, plan, tiny_corpus, tmp_path / "out2", "--embedding-size",
                             16)
    assert code == 1 and "run tied: tie_weights needs" in stderr


def test_a_run_that_saved_nothing_says_how_to_start_it_anew(plan, tiny_corpus, tmp_path,
                                                            capsys):
    out = tmp_path / "out"
    assert ablate(capsys, plan, tiny_corpus, out)[0] == 0
    for name in (ckpt.STATE, ckpt.WEIGHTS, ckpt.RESULTS):
        (out / "wide" / name).unlink()  # as if it had diverged before its first checkpoint
    plan.write_text(plan.read_text().replace("hidden_size = 24", "hidden_size = 20"))
    code, _, stderr = ablate(capsys, plan, tiny_corpus, out)
    assert code == 1 and f"it saved nothing yet: remove {out / 'wide'} to start it" in stderr


def test_a_run_may_start_from_another_runs_weights(tmp_path, tiny_run, tiny_corpus, capsys,
                                                   monkeypatch):
    """A relative `init_from` names the same run when the plan is rerun or resumed."""
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "tiny.toml", TINY)
    plan = tmp_path / "plan.toml"
    plan.write_text('[[run]]\npreset = "tiny.toml"\nname = "scratch"\n'
                    '[[run]]\npreset = "tiny.toml"\nname = "started"\n'
                    f'set = {{init_from = "{os.path.relpath(tiny_run)}"}}\n')
    out = tmp_path / "out"
    code, _, stderr = ablate(capsys, plan, tiny_corpus, out)
    assert code == 0, stderr
    rows = {row["name"]: row for row in read_csv(out / "results.csv")}
    assert float(rows["started"]["test_ppl"]) < float(rows["scratch"]["test_ppl"])
    (out / "started" / ckpt.RESULTS).unlink()  # as if stopped before its end: it resumes
    code, _, stderr = ablate(capsys, plan, tiny_corpus, out)
    assert code == 0, stderr
    assert ckpt.read_run_config(out / "started")[0].init_from == str(tiny_run.resolve())


def test_shipped_plans():
    runs, reference = load_plan("seed")
    assert reference == "lstm-baseline"
    assert [r.name for r in runs] == ["lstm-baseline", "awd-1-weight-drop", "awd-2-ntasgd",
                                      "awd-3-wd-ntasgd", "awd-4-variational-dropout",
                                      "awd-5-wd-ntasgd-vd", "awd-6-embedding-dropout",
                                      "awd-7-wd-ntasgd-vd-ed", "awd-8-weight-tying",
                                      "awd-9-wd-ntasgd-vd-ed-wt"]
    runs, reference = load_plan("paper")
    assert reference == "awd-lstm"
    assert [r.preset for r in runs] == ["awd-lstm", "awd-lstm-no-ntasgd",
                                        "awd-lstm-no-variable-bptt",
                                        "awd-lstm-no-embedding-dropout",
                                        "awd-lstm-no-weight-decay", "awd-lstm-no-ar-tar",
                                        "awd-lstm-no-weight-drop", "awd-lstm-full-embedding"]


@pytest.mark.parametrize("text, message", [
    ('[[run]]\npreset = "awd-1-weight-dro"\n', "run 1: unknown preset 'awd-1-weight-dro'"),
    ('[[run]\npreset = "lstm-baseline"\n', "invalid TOML"),
    ('reference = "lstm-baseline"\n', "no runs"),
    ('[[run]]\npreset = "lstm-baseline"\nhidden = 3\n', "run 1: unknown key 'hidden'"),
    ('[[run]]\npreset = "lstm-baseline"\nset = {hiden_size = 3}\n', "did you mean hidden_size"),
    ('[[run]]\npreset = "lstm-baseline"\n[[run]]\npreset = "lstm-baseline"\n', "two runs"),
    ('reference = "awd-lstm"\n[[run]]\npreset = "lstm-baseline"\n', "reference 'awd-lstm'"),
    ('[[run]]\npreset = "lstm-baseline"\nname = "../x"\n', "plain directory name"),
    ('[[run]]\npreset = "lstm-baseline"\nname = "results.md"\n', "taken by the report"),
])
def test_bad_plans_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "plan.toml"
    path.write_text(text)
    with pytest.raises(PlanError, match=message.replace("(", r"\(")):
        load_plan(str(path))
    code = main(["ablate", "--plan", str(path), "--data", str(tmp_path), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("lstmlm: error: plan ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unknown_plan_and_missing_file(tmp_path, capsys):
    with pytest.raises(PlanError, match="unknown plan 'seeds': did you mean seed"):
        load_plan("seeds")
    with pytest.raises(PlanError, match="not found"):
        load_plan(str(tmp_path / "nope.toml"))
    code = main(["ablate", "--plan", "seed", "--out", str(tmp_path / "out")])
    assert code == 1 and "ablate needs --data" in capsys.readouterr().err


def test_a_zero_budget_is_refused(plan, tmp_path, capsys):
    code = main(["ablate", "--plan", str(plan), "--data", str(tmp_path), "--out",
                 str(tmp_path / "out"), "--max-steps", "0"])
    assert code == 1 and "a budget of 0 means no limit" in capsys.readouterr().err
