"""`lstmlm report`: the comparison table and plots for any set of run directories."""

import csv
import math
import shutil
import sys

import pytest

from lstmlm import checkpoint as ckpt
from lstmlm.cli import main
from lstmlm.config import Config, load_preset
from lstmlm.report import COLUMNS, collect_row, describe, report, techniques


@pytest.fixture
def two_runs(tiny_run, tiny_corpus, tmp_path):
    """The session's one-epoch tiny run, and a wider one stopped by a step budget."""
    from lstmlm.train import run_training

    cfg = Config(data=str(tiny_corpus), embedding_size=16, hidden_size=24, num_layers=1,
                 batch_size=4, bptt=8, valid_batch_size=2, test_batch_size=2, lr=1.0,
                 max_steps=20, eval_interval=5)
    run_training(cfg, out=tmp_path / "wide", quiet=True)
    return tiny_run, tmp_path / "wide"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_on_two_run_directories(two_runs, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "report"
    code = main(["report", *map(str, two_runs), "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(COLUMNS)
    assert [r["name"] for r in rows] == ["run", "wide"]
    assert [r["status"] for r in rows] == ["finished", "budget"]
    assert rows[1]["stop_reason"] == "max_steps" and rows[1]["steps"] == "20"
    assert float(rows[0]["delta_test_ppl"]) == 0.0  # the first directory is the reference
    assert float(rows[1]["delta_test_ppl"]) == pytest.approx(
        float(rows[1]["test_ppl"]) - float(rows[0]["test_ppl"]))
    assert stdout == (out / "results.md").read_text()
    assert "Corpus **tiny_corpus" in stdout and "each run's own budget" in stdout
    for name in ("curves.png", "ablation.png"):
        assert (out / name).stat().st_size > 10_000
        height, width = matplotlib.image.imread(out / name).shape[:2]
        assert width > 400 and height > 300


def test_reference_and_default_out(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_run, wide = two_runs
    assert main(["report", str(tiny_run), "--reference", str(wide)]) == 0
    rows = read_csv(tmp_path / "results.csv")
    assert [r["name"] for r in rows] == ["wide", "run"]  # the reference is added, first
    assert float(rows[0]["delta_test_ppl"]) == 0.0 and float(rows[1]["delta_test_ppl"]) != 0.0
    assert "0.00 (ref)" in capsys.readouterr().out


def test_a_run_given_twice_is_one_row(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_run, wide = two_runs
    assert main(["report", str(tiny_run), str(wide), f"{tiny_run}/"]) == 0
    assert [r["name"] for r in read_csv(tmp_path / "results.csv")] == ["run", "wide"]
    assert capsys.readouterr().out.count("(ref)") == 1


def test_without_matplotlib_the_tables_are_still_written(two_runs, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    out = tmp_path / "report"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]


def test_an_unfinished_run_is_reported_from_its_metrics(two_runs, tmp_path):
    _, wide = two_runs
    unfinished = tmp_path / "unfinished"
    shutil.copytree(wide, unfinished)
    (unfinished / ckpt.RESULTS).unlink()
    finished, row = collect_row(wide), collect_row(unfinished)
    assert row["status"] == "incomplete" and row["test_ppl"] is None
    assert row["steps"] == 20 and row["best_valid_ppl"] == pytest.approx(
        finished["best_valid_ppl"])
    assert row["parameters"] == finished["parameters"]


def test_not_a_run_directory_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lstmlm: error: ") and "not an lstmlm run directory" in err
    assert err.count("\n") == 1


def test_an_out_that_is_a_file_is_a_one_line_error(two_runs, tmp_path, capsys):
    (tmp_path / "file").write_text("kept")
    assert main(["report", *map(str, two_runs), "--out", str(tmp_path / "file")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lstmlm: error: cannot create the folder ") and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "kept"


def test_markdown_cells_escape_a_bar_and_a_reference_without_test_ppl(two_runs, tmp_path):
    tiny_run, wide = two_runs
    odd, unfinished = tmp_path / "a|b", tmp_path / "unfinished"
    shutil.copytree(wide, odd)
    shutil.copytree(wide, unfinished)
    (unfinished / ckpt.RESULTS).unlink()
    markdown, _ = report([unfinished, odd], tmp_path / "report")
    rows = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| unfinished |") and "| – (ref) |" in rows[0]
    assert rows[1].startswith("| a\\|b |")
    header_cells = markdown.splitlines()[4].count(" | ")
    assert all(row.replace("\\|", "").count(" | ") == header_cells for row in rows)


def test_plots_fit_many_runs_long_names_and_a_diverged_run(monkeypatch, tmp_path):
    import lstmlm.report as report_module

    figures = []
    monkeypatch.setattr(report_module, "_png", lambda fig, path: figures.append(fig))
    rows = [{"name": f"run{i:02d}", "curve": [{"valid_ppl": 100.0 + i, "seconds": 60.0,
                                              "epoch": 1.0}],
             "test_ppl": 100.0 + i, "status": "finished", "reference": i == 0}
            for i in range(30)]
    rows[1]["name"] = "/home/someone/experiments/" * 4 + "runs/awd-lstm"  # 117 characters
    rows[2]["test_ppl"] = math.inf
    report_module.plot_curves(rows, tmp_path / "curves.png", "corpus", "budget")
    report_module.plot_ablation(rows, tmp_path / "ablation.png", "corpus", "budget")
    curves, ablation = figures
    (legend,) = curves.legends
    assert len(legend.get_texts()) == 30 and legend._ncols == 2  # 25 entries a column at most
    names = [t.get_text() for t in legend.get_texts()] + [
        t.get_text() for t in ablation.axes[0].get_xticklabels()]
    assert max(len(n.removesuffix(" (reference)")) for n in names) == 40
    assert "/home/someone/exper…iments/runs/awd-lstm" in names  # start and end kept
    assert "diverged" in [t.get_text() for t in ablation.axes[0].texts]


def test_techniques_follow_the_config():
    assert techniques(Config()) == ["weight decay"]
    assert techniques(load_preset("awd-lstm")) == [
        "weight drop", "NT-ASGD", "variational dropout", "embedding dropout", "weight tying",
        "variable BPTT", "AR/TAR", "weight decay"]
    assert "AR/TAR" not in techniques(load_preset("awd-lstm-no-ar-tar"))
    assert techniques(load_preset("awd-1-weight-drop")) == ["weight drop", "weight decay"]


def test_budget_description():
    def row(**kw):
        return {"cfg": Config(data="/data/wikitext-2/", **kw)}
    assert describe([row(max_minutes=30.0, epochs=1_000_000)] * 2) == (
        "wikitext-2", "30 min per run, seed 1111")
    assert describe([row(epochs=5), row(epochs=5, seed=2)]) == ("wikitext-2", "5 epochs per run")
    assert describe([row(epochs=5), row(epochs=6)])[1] == "each run's own budget"
