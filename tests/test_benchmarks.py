"""benchmarks/throughput.py runs end to end (on a tiny corpus and model; no timing asserted)."""

import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
TINY = ["embedding_size=16", "hidden_size=16", "last_hidden_size=16", "batch_size=4", "bptt=8",
        "valid_batch_size=2"]


def load_script(name: str):
    """A benchmark script as a module, to call its functions."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_quick_json(tiny_corpus, tmp_path):
    """One run with every extra worker: under torch.compile, and with lstmlm from another
    source tree (--against SRC), here a copy of this tree whose package leaves a mark when
    imported."""
    import shutil

    other = tmp_path / "other" / "src"
    shutil.copytree(Path(__file__).resolve().parents[1] / "src" / "lstmlm", other / "lstmlm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    mark = tmp_path / "imported"
    with open(other / "lstmlm" / "__init__.py", "a") as f:
        f.write(f"\nopen({str(mark)!r}, 'w').close()\n")
    command = [sys.executable, str(SCRIPT), "--quick", "--preset", "lstm-baseline", "--json",
               "--data", str(tiny_corpus), "--threads", "1", "--gemm-size", "256",
               "--eval-windows", "3", "--compile", "--against", str(other)]
    # (With the adaptive softmax, whose FLOPs differ from the plain step's full softmax.)
    for assignment in TINY + ["max_vocab=20", "softmax=adaptive", "adaptive_cutoffs=10"]:
        command += ["--set", assignment]
    env = {**os.environ, "LSTMLM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # exactly one JSON object on stdout
    assert result["preset"] == "lstm-baseline" and result["vocab_size"] == 20
    # 3 windows, rounded up to a whole group of those that evaluate scores together
    assert result["eval_windows"] == 1024 // (2 * 8) and result["eval_b1_windows"] == 1024 // 8
    for key in ("train_tokens_per_s", "eval_tokens_per_s", "eval_b1_tokens_per_s",
                "gemm_gflops", "gemm_gflops_median", "train_fraction_of_peak",
                "eval_fraction_of_peak",
                "plain_train_tokens_per_s",
                "plain_train_fraction_of_peak", "ratio_to_plain", "peak_train_mb",
                "plain_tuned_train_tokens_per_s", "ratio_to_plain_tuned",
                "peak_eval_mb", "forward_flops_per_token", "compiled_train_tokens_per_s",
                "against_train_tokens_per_s", "ratio_to_against"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert result["compiled_ratio"] == pytest.approx(
        result["compiled_train_tokens_per_s"] / result["train_tokens_per_s"])
    assert mark.exists() and result["against"] == str(other.resolve())
    assert result["forward_flops_per_token"] < result["plain_forward_flops_per_token"]
    for prefix, flops in (("", "forward_flops_per_token"),
                          ("plain_", "plain_forward_flops_per_token")):
        assert result[f"{prefix}train_fraction_of_peak"] == pytest.approx(
            result[f"{prefix}train_tokens_per_s"] * 3 * result[flops] / result["gemm_gflops"] / 1e9)


def test_throughput_against_a_folder_without_lstmlm_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        load_script("throughput").parse_args(["--against", str(tmp_path)])
    assert stop.value.code == 2 and "no lstmlm package there" in capsys.readouterr().err


def test_the_plain_step_counts_the_flops_of_lstmlm_with_a_full_softmax():
    from lstmlm.config import Config
    from lstmlm.model import LSTMLM

    throughput = load_script("throughput")
    for cfg, sizes in ((Config(embedding_size=8, hidden_size=12, num_layers=2), [8, 12, 12]),
                       (Config(embedding_size=8, hidden_size=12, num_layers=3,
                               last_hidden_size=8), [8, 12, 12, 8])):
        assert throughput.forward_flops_per_token(LSTMLM(cfg, 50)) == \
            throughput.forward_flops_per_token(throughput.PlainLM(50, sizes))


def test_throughput_json_is_a_line_per_preset(tiny_corpus, monkeypatch, capsys):
    throughput = load_script("throughput")
    monkeypatch.setattr(throughput, "bench_preset", lambda name, *args: {"preset": name})
    throughput.main(["--preset", "lstm-baseline,awd-lstm-cpu", "--json",
                     "--data", str(tiny_corpus)])
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["preset"] for line in lines] == ["lstm-baseline", "awd-lstm-cpu"]


def test_throughput_table(capsys):
    throughput = load_script("throughput")
    result = {"preset": "awd-lstm", "train_tokens_per_s": 860.4, "eval_tokens_per_s": 2058.0,
              "eval_batch_size": 10, "eval_b1_tokens_per_s": 1143.0, "peak_train_mb": 2668.0,
              "train_fraction_of_peak": 0.923, "eval_fraction_of_peak": 0.737,
              "plain_train_tokens_per_s": 554.0, "plain_train_fraction_of_peak": 0.595,
              "ratio_to_plain": 1.55, "gemm_gflops_median": 180.1,
              "plain_tuned_train_tokens_per_s": 781.0,
              "ratio_to_plain_tuned": 1.10, "gemm_gflops": 187.2, "gemm_size": 4096, "device": "cpu",
              "threads": 2, "memory": "VmHWM (resident set)", "windows": 5,
              "compiled_train_tokens_per_s": 851.8, "compiled_ratio": 0.99}
    throughput.print_table([result])
    out = capsys.readouterr().out
    assert ("awd-lstm: training tokens/s 860, under torch.compile 852 (interleaved), "
            "ratio 0.990") in out
    header, row = out.splitlines()[:2]
    assert header.split()[:4] == ["preset", "train", "tok/s", "eval"]
    assert "eval % peak b10" in header
    assert row.split() == ["awd-lstm", "860", "2058", "1143", "2668", "92.3", "73.7", "554",
                           "59.5", "1.55", "781", "1.10"]


def test_ranks_json(tiny_corpus, tmp_path):
    script = SCRIPT.with_name("ranks.py")
    wiki = tmp_path / "wiki"  # the corpus under WikiText's own file names
    wiki.mkdir()
    for split in ("train", "valid", "test"):
        (wiki / f"wiki.{split}.tokens").write_text((tiny_corpus / f"{split}.txt").read_text())
    command = [sys.executable, str(script), "--data", str(wiki), "--ranks", "1", "2",
               "--steps", "8", "--json", "--preset", "lstm-baseline"]
    for assignment in TINY:
        command += ["--set", assignment]
    env = {**os.environ, "LSTMLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [r["ranks"] for r in result["results"]] == [1, 2]
    assert all(r["tokens_per_s"] > 0 for r in result["results"])
    assert result["results"][0]["speedup"] == 1.0


def test_ranks_copies_a_data_directory_or_one_text_file(tmp_path):
    ranks = load_script("ranks")
    text = f"{' '.join(['w'] * 999)}\n" * 60  # 60 lines of 1,000 tokens

    def line_counts(folder: Path) -> list[int]:
        return [len((folder / f"{s}.txt").read_text().splitlines())
                for s in ("train", "valid", "test")]

    book = tmp_path / "book.txt"
    book.write_text(text)
    # One file's parts, 54 training lines then 3 and 3, each too short to be cut.
    assert line_counts(ranks.small_eval_copy(book, tmp_path / "from-file")) == [54, 3, 3]
    folder = tmp_path / "dir"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text(text)
    # Held-out splits end with the line that reaches 20,000 tokens.
    assert line_counts(ranks.small_eval_copy(folder, tmp_path / "from-dir")) == [60, 20, 20]


def test_budget_json(tiny_corpus, tmp_path, capsys):
    command = [sys.executable, str(SCRIPT.with_name("budget.py")), "--preset", "lstm-baseline",
               "--minutes", "0.02", "--data", str(tiny_corpus), "--json", "--cache",
               "--out", str(tmp_path / "run")]
    for assignment in TINY:
        command += ["--set", assignment]
    env = {**os.environ, "LSTMLM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["preset"] == "lstm-baseline" and result["minutes"] == 0.02
    assert result["test_ppl"] > 1 and result["best_valid_ppl"] > 1
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["stop_reason"] == "max_minutes" and saved["test_ppl"] == result["test_ppl"]
    code, out, err = run(capsys, "evaluate", tmp_path / "run", "--split", "test", "--cache",
                         "--json")
    assert code == 0, err
    assert result["test_ppl_cache"] == pytest.approx(json.loads(out)["ppl"])


def run_script(monkeypatch, name: str, *args) -> int | str:
    """`python benchmarks/NAME ARGS` run in this process, for a command that stops early: the
    status it exits with (a string is printed to stderr, with status 1)."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(SCRIPT.with_name(name)), run_name="__main__")
    return stop.value.code


def test_budget_bad_preset_is_one_line(monkeypatch):
    status = run_script(monkeypatch, "budget.py", "--preset", "no-such-preset")
    assert status.startswith("budget.py: error: ") and "no-such-preset" in status


@pytest.mark.parametrize("script, args, message", [
    ("budget.py", ["--minutes", "0"], "--minutes must be above 0"),
    ("ranks.py", ["--steps", "0"], "--steps and every --ranks count must be at least 1"),
    ("kernels.py", ["--reps", "0"], "--reps and --threads must be at least 1"),
    ("decoder_loss.py", ["--chunks", "0"], "every --chunks value must be at least 1"),
])
def test_counts_that_would_mean_no_limit_or_nothing_are_refused(script, args, message,
                                                                monkeypatch, capsys):
    assert run_script(monkeypatch, script, *args) == 2
    assert message in capsys.readouterr().err


def test_decoder_loss_scoring_runs(capsys, two_threads):
    # Forward passes only, at the real lstm-baseline size: a few seconds.
    load_script("decoder_loss").main(["--sizes", "lstm-baseline", "--reps", "1", "--threads",
                                      "2", "--scoring", "--no-memory"])
    out = capsys.readouterr().out
    assert "a scoring pass" in out
    rows = [line.split() for line in out.splitlines()
            if line.split()[:1] in (["straightforward"], ["fused,"])]
    assert len(rows) == 2 and all(float(r[-2]) > 0 for r in rows)  # GFLOP/s


def test_kernels_prints_every_case(capsys, two_threads):
    kernels = load_script("kernels")
    packed = kernels.packed_products(torch.randn(10, 8), torch.randn(16, 8))
    kernels.main(["--reps", "1"])  # at the real sizes
    out = capsys.readouterr().out
    times = [float(line.split(" ms")[0].split()[-1]) for line in out.splitlines()
             if " ms" in line]
    assert len(times) == 29 + len(packed) and all(t > 0 for t in times)
    assert all(f"the same, {name}" in out for name in packed)


def test_kernels_packed_products_equal_the_plain_one():
    # packed_products checks each against hidden @ weight.t() itself and raises if one differs.
    products = load_script("kernels").packed_products(torch.randn(10, 32), torch.randn(64, 32),
                                                      compiled=True)
    assert "torch.compile's own kernel" in products
    if torch.backends.mkldnn.is_available():
        assert "oneDNN, weight reordered for 10 rows" in products


def test_corpus_benchmark_json(tmp_path):
    script = SCRIPT.with_name("corpus.py")
    done = subprocess.run([sys.executable, str(script), "--tokens", "3000", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["this"]
    assert result["train_tokens"] > 3000  # the words and one <eos> per line
    for key in ("tokenize_s", "cached_load_s", "tokenize_peak_mb", "cached_peak_mb"):
        assert isinstance(result[key], (int, float)) and result[key] >= 0, key


def test_throughput_sizes_evaluation_windows_by_work_and_device():
    from lstmlm.config import Config

    throughput = load_script("throughput")
    cfg, flops = Config(bptt=70), 67_002_400  # awd-lstm: 4.7 GFLOP a window at batch 1
    assert throughput.eval_windows_for(cfg, 10, flops, None) == 1
    assert throughput.eval_windows_for(cfg, 10, flops, None, scale=100) == 107
    # at batch 1 in whole groups of 1024 // 70 = 14 windows, as evaluate scores them
    assert throughput.eval_windows_for(cfg, 1, flops, None) == 14
    assert throughput.eval_windows_for(cfg, 1, flops, None, scale=100) == 1078
    assert throughput.eval_windows_for(cfg, 10, flops, 3, scale=100) == 3
