"""The `lstmlm` command, run in-process: every user mistake is one line on stderr, no traceback."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

import lstmlm
from lstmlm.ablate import load_plan
from lstmlm.cli import build_parser, config_overrides, main
from lstmlm.config import load_preset
from tests.helpers import Terminal, make_corpus, run, snapshot

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Keeps `train` quick whenever it gets as far as building a model.
SMALL = ["--embedding-size", "8", "--hidden-size", "8", "--num-layers", "1", "--batch-size", "2",
         "--bptt", "4", "--valid-batch-size", "1", "--test-batch-size", "1", "--epochs", "1"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No cache in the home directory, and no default `runs/` beside the tests."""
    monkeypatch.chdir(tmp_path)


def user_error(capsys, *argv) -> str:
    """Run a command that must fail with exit status 1 and one line on stderr; that line."""
    code, out, err = run(capsys, *argv)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("lstmlm: error: "), err
    assert code == 1
    assert out == ""
    return lines[0]


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run, free to damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run_copy"))


# ---- train: data mistakes ---------------------------------------------------------------------

@pytest.mark.parametrize("splits, message", [
    ({"valid": None}, "missing the valid split"),
    ({"train": None}, "missing the train split"),
    ({"test": ""}, "contains no words"),
    ({"test": " \n\n\t\n"}, "contains no words"),
    ({"train": b"a b c\n\x00\x01\x02 binary\n"}, "binary file"),
    ({"valid": b"\xff\xfea\x00b\x00"}, "binary file"),  # UTF-16 text has NUL bytes
    ({"valid": b"\xff\xfe hello world\n"}, "not UTF-8"),
    ({"train": "caf\u00e9 ok\n".encode("latin-1")}, "not UTF-8"),
])
def test_train_refuses_bad_data_and_creates_no_run(capsys, tmp_path, splits, message):
    data = make_corpus(tmp_path / "data", **splits)
    line = user_error(capsys, "train", "--data", data, "--out", tmp_path / "run", *SMALL)
    assert message in line
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()


def test_train_refuses_a_missing_data_directory(capsys, tmp_path):
    line = user_error(capsys, "train", "--data", tmp_path / "nope", "--out", tmp_path / "run",
                      *SMALL)
    assert "no such file or directory" in line and str(tmp_path / "nope") in line
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_text_file_too_short_to_cut(capsys, tmp_path):
    (tmp_path / "corpus.txt").write_text("a b c\nd e\n")
    line = user_error(capsys, "train", "--data", tmp_path / "corpus.txt", "--out",
                      tmp_path / "run", *SMALL)
    assert "corpus.txt: 2 line(s); one text file is cut by lines into train, valid and test" in line
    assert not (tmp_path / "run").exists()


def test_one_text_file_trains_and_evaluates_by_its_parts(capsys, tmp_path, monkeypatch):
    book = tmp_path / "book.txt"  # 60 lines: 54 for training, then 3 and 3
    book.write_text("".join(f"line {i} a b c\n" for i in range(60)))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", "--data", "book.txt", "--out", tmp_path / "run", *SMALL)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["data"] == str(book.resolve())  # found again from any folder
    words = (tmp_path / "run" / "vocab.txt").read_text().split()
    assert "53" in words and "54" not in words
    monkeypatch.chdir(tmp_path / "run")
    for split, first in (("valid", 54), ("test", 57)):
        code, out, _ = run(capsys, "evaluate", tmp_path / "run", "--split", split,
                           "--batch-size", "1", "--json")
        result = json.loads(out)
        assert code == 0 and result["data"] == f"{book.resolve()} ({split} part)"
        # 3 lines of 6 tokens, the first not predicted; the line numbers are unknown words.
        assert result["tokens"] == 17 and result["unknown_words"] == 3
    code, out, _ = run(capsys, "evaluate", tmp_path / "run", "--dynamic", "--json",
                       "--dynamic-batches", "1")
    assert code == 0 and json.loads(out)["tokens"] == 17


def test_train_refuses_too_little_data_for_the_batch_size(capsys, tmp_path):
    data = make_corpus(tmp_path / "data", test="a\n")
    line = user_error(capsys, "train", "--data", data, "--out", tmp_path / "run", *SMALL,
                      "--test-batch-size", "5")
    assert "the test split has 2 tokens, too few for test_batch_size 5" in line
    assert not (tmp_path / "run").exists()


# ---- train: configuration mistakes ------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "lstm-baselin"], "did you mean lstm-baseline?"),
    (["--set", "hiden_size=10"], "did you mean hidden_size?"),
    (["--set", "no_such_thing=1"], "unknown config key 'no_such_thing'"),
    (["--set", "hidden_size"], "expected key=value"),
    (["--set", "batch_size=abc"], "batch_size must be int, got 'abc'"),
    (["--batch-size", "1.5"], "batch_size must be int, got '1.5'"),
    (["--lr", "fast"], "lr must be float"),
    (["--set", "dropout_output=1.5"], "dropout_output must be in [0, 1), got 1.5"),
    (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["--lr", "0"], "lr must be > 0"),
    (["--optimizer", "rmsprop"], "optimizer must be sgd, adam or adamw"),
    (["--device", "tpu"], "device must be cpu, cuda or auto"),
])
def test_train_refuses_bad_config_and_creates_no_run(capsys, tmp_path, args, message):
    data = make_corpus(tmp_path / "data")
    line = user_error(capsys, "train", "--data", data, "--out", tmp_path / "run", *SMALL, *args)
    assert message in line
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()


def test_train_refuses_a_bad_preset_file(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("hidden_size = 'big'\n")
    line = user_error(capsys, "train", "--preset", bad, "--out", tmp_path / "run")
    assert "hidden_size must be int" in line
    bad.write_text("hidden_size = [\n")
    assert "invalid TOML" in user_error(capsys, "train", "--preset", bad, "--out", tmp_path / "r")
    assert not (tmp_path / "run").exists()


def test_train_does_not_overwrite_an_existing_run(capsys, run_copy, tiny_corpus):
    before = snapshot(run_copy)
    line = user_error(capsys, "train", "--data", tiny_corpus, "--out", run_copy, *SMALL)
    assert "already holds a run" in line and "--resume" in line
    assert snapshot(run_copy) == before


def test_resume_refuses_a_changed_model(capsys, run_copy):
    before = snapshot(run_copy)
    line = user_error(capsys, "train", "--resume", run_copy, "--hidden-size", "32")
    assert "cannot change hidden_size when resuming" in line
    line = user_error(capsys, "train", "--resume", run_copy, "--set", "lr=0.1", "--set",
                      "dropout_input=0.5")
    assert "cannot change dropout_input, lr when resuming" in line
    assert snapshot(run_copy) == before


def test_resume_refuses_preset_and_out(capsys, run_copy, tmp_path):
    before = snapshot(run_copy)
    assert "drop --preset and --out" in user_error(
        capsys, "train", "--resume", run_copy, "--out", tmp_path / "other")
    assert snapshot(run_copy) == before
    assert not (tmp_path / "other").exists()


def test_resume_refuses_a_missing_run(capsys, tmp_path):
    assert "no such run directory" in user_error(capsys, "train", "--resume", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_init_from_takes_the_runs_settings_unless_a_preset_is_given(capsys, tiny_run, tmp_path):
    data = make_corpus(tmp_path / "mine", train="the cat sat on a rug\n" * 20)
    code, out, err = run(capsys, "train", "--init-from", tiny_run, "--data", data,
                         "--max-steps", "2")
    assert code == 0, err
    assert "weights from" in err and "keep their rows (7 of 8)" in err
    base = json.loads((tiny_run / "config.json").read_text())["config"]
    new = json.loads((tmp_path / "runs" / "run-mine" / "config.json").read_text())["config"]
    assert {k for k in base if base[k] != new[k]} == {"data", "init_from", "max_steps"}
    assert new["init_from"] == str(tiny_run.resolve())
    line = user_error(capsys, "train", "--init-from", tiny_run, "--data", data, "--preset",
                      "lstm-baseline", "--out", tmp_path / "other")
    assert "the model's shape must be that run's (embedding_size 16 there, 380 here" in line
    assert not (tmp_path / "other").exists()


# ---- damaged or missing run directories -------------------------------------------------------

def commands(run_dir):
    """evaluate and generate on `run_dir`: both load the run first."""
    return [["evaluate", run_dir], ["generate", run_dir, "--prompt", "the cat"]]


@pytest.mark.parametrize("which", [0, 1])
def test_a_run_directory_that_does_not_exist(capsys, tmp_path, which):
    line = user_error(capsys, *commands(tmp_path / "nope")[which])
    assert "no such run directory" in line
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("which", [0, 1])
def test_a_directory_that_is_not_a_run(capsys, tmp_path, which):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("hello\n")
    line = user_error(capsys, *commands(tmp_path / "notes")[which])
    assert "is not an lstmlm run directory (no config.json)" in line


@pytest.mark.parametrize("keep", [0, 7, 0.5, -1])
@pytest.mark.parametrize("which", [0, 1])
def test_a_truncated_model_file(capsys, run_copy, keep, which):
    path = run_copy / "model.safetensors"
    data = path.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:size])
    line = user_error(capsys, *commands(run_copy)[which])
    assert "model.safetensors: damaged or not a safetensors file" in line


def test_a_model_file_that_is_not_safetensors(capsys, run_copy):
    (run_copy / "model.safetensors").write_text("not a tensor file at all\n")
    assert "damaged or not a safetensors file" in user_error(capsys, "evaluate", run_copy)


def test_a_missing_model_file(capsys, run_copy):
    (run_copy / "model.safetensors").unlink()
    assert "no model.safetensors yet" in user_error(capsys, "evaluate", run_copy)


def test_weights_that_do_not_match_the_config(capsys, run_copy):
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["config"]["hidden_size"] = 32
    (run_copy / "config.json").write_text(json.dumps(cfg))
    assert "weights do not match config.json" in user_error(capsys, "evaluate", run_copy)


@pytest.mark.parametrize("which", [0, 1])
def test_a_run_from_a_newer_lstmlm(capsys, run_copy, which):
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["format_version"] = 999
    (run_copy / "config.json").write_text(json.dumps(cfg))
    line = user_error(capsys, *commands(run_copy)[which])
    assert "newer lstmlm (format 999" in line and "upgrade lstmlm" in line


@pytest.mark.parametrize("content", [
    "", "{not json", "[]", '{"format_version": 1}',
    '{"format_version": 1, "vocab_size": 16, "config": null}',
    '{"format_version": 1, "vocab_size": 16.0, "config": {}}',
    '{"format_version": 1, "vocab_size": "16", "config": {}}',
])
def test_a_damaged_config_file(capsys, run_copy, content):
    (run_copy / "config.json").write_text(content)
    assert "config.json: damaged" in user_error(capsys, "evaluate", run_copy)


def test_out_of_memory_is_one_line(capsys, tmp_path):
    data = make_corpus(tmp_path / "data")
    line = user_error(capsys, "train", "--data", data, "--out", tmp_path / "run", *SMALL,
                      "--hidden-size", "3000000")
    assert line.startswith("lstmlm: error: out of memory (") and "smaller model" in line
    assert not (tmp_path / "run").exists()


def test_a_reader_that_goes_away_is_not_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "lstmlm", "presets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the interpreter has started and printed anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_a_config_file_with_a_bad_value(capsys, run_copy):
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["config"]["dropout_output"] = 2.0
    (run_copy / "config.json").write_text(json.dumps(cfg))
    assert "dropout_output must be in [0, 1)" in user_error(capsys, "evaluate", run_copy)


@pytest.mark.parametrize("change", ["drop_one", "add_one"])
@pytest.mark.parametrize("which", [0, 1])
def test_a_vocabulary_of_the_wrong_size(capsys, run_copy, change, which):
    path = run_copy / "vocab.txt"
    words = path.read_text().split("\n")[:-1]
    if change == "drop_one":
        words.remove(next(w for w in words if w not in ("<eos>", "<unk>")))
    else:
        words.append("extra")
    path.write_text("\n".join(words) + "\n")
    line = user_error(capsys, *commands(run_copy)[which])
    assert "vocab.txt" in line and "inconsistent" in line


@pytest.mark.parametrize("content", [b"\xff\xfe\x00junk", b"only words\nno markers\n"])
def test_a_damaged_vocabulary(capsys, run_copy, content):
    (run_copy / "vocab.txt").write_bytes(content)
    assert "vocab.txt: damaged vocabulary file" in user_error(capsys, "evaluate", run_copy)


def test_a_missing_vocabulary(capsys, run_copy):
    (run_copy / "vocab.txt").unlink()
    assert "vocab.txt: missing" in user_error(capsys, "generate", run_copy, "--prompt", "a")


# ---- evaluate ---------------------------------------------------------------------------------

def count_tokens(path: Path) -> int:
    return sum(len(line.split()) + 1 for line in path.read_text().splitlines())


def test_evaluate_json(capsys, tiny_run, tiny_corpus):
    code, out, err = run(capsys, "evaluate", tiny_run, "--json")
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 1
    result = json.loads(out)
    assert result["split"] == "test"
    assert {"loss", "ppl", "tokens", "seconds"} <= set(result) and result["seconds"] >= 0
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    # Batch size 2 (the run's test batch size): each column drops its last token as a target.
    assert result["tokens"] == (count_tokens(tiny_corpus / "test.txt") // 2 - 1) * 2
    # The same best weights on the same split: what training reported.
    results = json.loads((tiny_run / "results.json").read_text())
    assert result["loss"] == pytest.approx(results["test_loss"], rel=1e-6)


@pytest.mark.parametrize("options, label", [
    ([], "test:"), (["--split", "valid"], "valid:"), (["--cache"], "test, cache:"),
    (["--cache-search"], "valid, cache search:"),
    (["--dynamic", "--dynamic-batches", "2"], "test, dynamic:"),
])
def test_evaluate_shows_its_progress_on_a_terminal(capsys, monkeypatch, tiny_run, options,
                                                   label):
    code, out, err = run(capsys, "evaluate", tiny_run, "--json", *options)
    assert code == 0 and err == ""  # no bar where stderr is not a terminal
    quiet = json.loads(out)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code, out, _ = run(capsys, "evaluate", tiny_run, "--json", *options)
    assert code == 0 and label in terminal.getvalue()
    shown = json.loads(out)
    assert quiet.pop("seconds") >= 0 and shown.pop("seconds") >= 0 and shown == quiet


def test_evaluate_other_split_and_batch_size(capsys, tiny_run, tiny_corpus):
    code, out, _ = run(capsys, "evaluate", tiny_run, "--json", "--split", "valid",
                       "--batch-size", "1")
    result = json.loads(out)
    assert code == 0 and result["split"] == "valid" and result["batch_size"] == 1
    assert result["tokens"] == count_tokens(tiny_corpus / "valid.txt") - 1
    assert result["tokens_left_out"] == 0


def test_evaluate_text(capsys, tiny_run):
    code, out, err = run(capsys, "evaluate", tiny_run, "--split", "valid")
    assert code == 0 and err == ""
    assert out.startswith("valid: loss ") and "perplexity" in out
    assert len(out.splitlines()) == 1


@pytest.mark.filterwarnings("ignore:.*not in the vocabulary")
@pytest.mark.parametrize("argv", [
    ["evaluate", "--split", "valid", "--json"],
    ["evaluate", "--split", "valid", "--json", "--cache"],
    ["evaluate", "--split", "valid", "--json", "--dynamic", "--dynamic-batches", "2"],
    ["score", "--json"],
    ["generate", "--prompt", "a b", "--max-tokens", "3", "--seed", "1"],
])
def test_inference_takes_a_device(capsys, tiny_run, tmp_path, argv):
    command, *rest = argv
    if command == "score":
        (tmp_path / "text.txt").write_text("a b c\n")
        rest.insert(0, tmp_path / "text.txt")
    on_cpu = run(capsys, command, tiny_run, *rest)
    on_auto = run(capsys, command, tiny_run, *rest, "--device", "auto")
    assert on_cpu[0] == on_auto[0] == 0
    if not torch.cuda.is_available():  # auto is the CPU here: the very same output
        strip = (lambda out: {k: v for k, v in json.loads(out).items() if k != "seconds"}
                 if "--json" in rest else out)
        assert strip(on_auto[1]) == strip(on_cpu[1])
        assert "no CUDA GPU is available" in user_error(capsys, command, tiny_run, *rest,
                                                        "--device", "cuda")


def test_evaluate_on_other_data(capsys, tiny_run, tmp_path):
    data = make_corpus(tmp_path / "data", test="the cat sat on the zebra\n" * 20)
    code, out, _ = run(capsys, "evaluate", tiny_run, "--data", data, "--json")
    result = json.loads(out)
    assert code == 0 and result["unknown_words"] == 20
    assert result["tokens"] + result["tokens_left_out"] == 7 * 20 - 1  # 6 words + <eos> a line
    # The text output says both, not only --json.
    code, out, _ = run(capsys, "evaluate", tiny_run, "--data", data, "--batch-size", "3")
    assert code == 0 and out.rstrip().endswith(
        "| 20 unknown words read as <unk> | 4 tokens not scored (batch split)")


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-3"], "--batch-size must be at least 1, got -3"),
    (["--batch-size", "100000"], "too few for --batch-size 100000"),
    (["--data", "/no/such/dir"], "--data /no/such/dir: no such file or directory"),
])
def test_evaluate_mistakes(capsys, tiny_run, args, message):
    assert message in user_error(capsys, "evaluate", tiny_run, *args)


def test_evaluate_on_bad_data(capsys, tiny_run, tmp_path):
    data = make_corpus(tmp_path / "data", test=b"\x00\x00")
    assert "binary file" in user_error(capsys, "evaluate", tiny_run, "--data", data)
    data = make_corpus(tmp_path / "data2", test=None)
    assert "missing the test split" in user_error(capsys, "evaluate", tiny_run, "--data", data)


# ---- generate ---------------------------------------------------------------------------------

def test_generate_with_a_seed_prints_the_same_text_twice(capsys, tiny_run):
    args = ["generate", tiny_run, "--prompt", "the cat", "--max-tokens", "20", "--seed", "7"]
    code, first, err = run(capsys, *args)
    assert code == 0 and err == ""
    assert first.startswith("the cat") and first.endswith("\n") and len(first.split()) > 2
    assert run(capsys, *args)[1] == first
    others = {run(capsys, *args[:-1], str(seed))[1] for seed in range(5)}
    assert len(others) > 1


def test_generate_prints_what_the_api_returns(capsys, tiny_run):
    # The prompt is a whole sentence: the continuation is likely to start a new line.
    for prompt, seed in [("the cat", 1), ("the cat sat on the mat", 2), ("a dog\nsome", 3),
                         ("the cat sat on the mat\n", 4)]:
        code, out, _ = run(capsys, "generate", tiny_run, "--prompt", prompt, "--max-tokens", "25",
                           "--seed", seed)
        text = lstmlm.load(tiny_run).generate(prompt, max_tokens=25, seed=seed)
        expected = prompt + ("" if prompt.endswith("\n") else " ") + text + "\n"
        # Compare line by line, ignoring trailing spaces; a leading space would be a bug.
        assert [line.rstrip() for line in out.splitlines()] == \
            [line.rstrip() for line in expected.splitlines()]


def test_generate_num_samples(capsys, tiny_run):
    code, out, err = run(capsys, "generate", tiny_run, "--prompt", "a dog", "--max-tokens", "6",
                         "--num-samples", "3", "--seed", "1")
    assert code == 0 and err == ""
    headers = [line for line in out.splitlines() if line.startswith("--- sample")]
    assert headers == ["--- sample 1 ---", "--- sample 2 ---", "--- sample 3 ---"]
    texts = lstmlm.load(tiny_run).generate("a dog", max_tokens=6, num_samples=3, seed=1)
    assert out == "".join(f"--- sample {i + 1} ---\na dog {t}\n" for i, t in enumerate(texts))
    # After a whole sentence a sample is likely to start a new line: no space before it.
    prompt = "the cat sat on the mat"
    code, out, _ = run(capsys, "generate", tiny_run, "--prompt", prompt, "--max-tokens", "6",
                       "--num-samples", "3", "--seed", "2")
    texts = lstmlm.load(tiny_run).generate(prompt, max_tokens=6, num_samples=3, seed=2)
    assert any(t.startswith("\n") for t in texts)
    assert out == "".join(f"--- sample {i + 1} ---\n{prompt}{'' if t[0] == chr(10) else ' '}{t}\n"
                          for i, t in enumerate(texts))


def test_generate_greedy(capsys, tiny_run):
    code, out, _ = run(capsys, "generate", tiny_run, "--prompt", "the cat", "--temperature", "0",
                       "--max-tokens", "10")
    greedy = lstmlm.load(tiny_run).generate("the cat", max_tokens=10, temperature=0)
    assert code == 0 and out.split() == ["the", "cat"] + greedy.split()


def test_generate_without_a_prompt_starts_a_line(capsys, tiny_run):
    code, out, _ = run(capsys, "generate", tiny_run, "--temperature", "0", "--max-tokens", "10")
    assert code == 0 and out == lstmlm.load(tiny_run).generate(max_tokens=10, temperature=0) + "\n"


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a", "--temperature=-0.5"], "temperature must be >= 0"),
    (["--prompt", "a", "--temperature", "nan"], "temperature must be >= 0"),
    (["--prompt", "a", "--top-p", "0"], "top-p must be in (0, 1]"),
    (["--prompt", "a", "--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--prompt", "a", "--top-k=-1"], "top-k must be >= 0"),
    (["--prompt", "a", "--max-tokens", "0"], "max tokens must be between 1"),
    (["--prompt", "a", "--num-samples", "0"], "number of samples must be between 1 and 1024"),
])
def test_generate_mistakes(capsys, tiny_run, args, message):
    assert message in user_error(capsys, "generate", tiny_run, *args)


def test_sampling_mistakes_are_reported_before_loading(capsys, tmp_path):
    # Checked first: no need to wait for a model to learn that --top-p is wrong.
    line = user_error(capsys, "generate", tmp_path / "nope", "--prompt", "a", "--top-p", "2")
    assert "top-p" in line


# ---- presets and argparse ---------------------------------------------------------------------

def test_presets_lists_the_baseline_with_its_description(capsys):
    preset = resources.files("lstmlm") / "presets" / "lstm-baseline.toml"
    description = tomllib.loads(preset.read_text(encoding="utf-8"))["description"]
    code, out, err = run(capsys, "presets")
    assert code == 0 and err == ""
    line = next(line for line in out.splitlines() if line.split()[0] == "lstm-baseline")
    assert line.endswith(description)


@pytest.mark.parametrize("argv", [
    ["evaluate", "somewhere", "--bogus"],
    ["frobnicate"],
    [],
    ["generate"],  # the run directory is required
    ["evaluate", "somewhere", "--batch-size", "1.5"],
    ["evaluate", "somewhere", "--split", "dev"],
    ["generate", "somewhere", "--prompt", "a", "--max-tokens", "many"],
])
def test_argparse_errors_exit_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lstmlm") and ": error: " in lines[0]
    assert "--help" in lines[0]


@pytest.mark.parametrize("argv, command", [
    (["evaluate", "somewhere", "--bogus"], "evaluate"),
    (["train", "--no-such-flag", "3"], "train"),
    (["presets", "extra"], "presets"),
])
def test_an_unknown_flag_is_reported_by_its_command(capsys, argv, command):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert err.startswith(f"lstmlm {command}: error: unrecognized arguments: ")
    assert err.rstrip().endswith(f"(see lstmlm {command} --help)")


def test_lstmlm_warnings_are_formatted_only_while_a_command_runs(capsys):
    import warnings

    before = warnings.formatwarning
    assert main(["presets"]) == 0
    assert warnings.formatwarning is before


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"lstmlm {lstmlm.__version__} (torch {torch.__version__})\n"


def test_evaluate_help_gives_the_real_defaults(capsys):
    from lstmlm import cache, dynamic

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for value in (cache.DEFAULT_WINDOW, cache.DEFAULT_THETA, cache.DEFAULT_LAMBDA,
                  dynamic.DEFAULT_LR, dynamic.DEFAULT_DECAY, dynamic.DEFAULT_BPTT,
                  dynamic.DEFAULT_STAT_BATCHES):
        assert f"(default {value})" in text, value


@pytest.mark.parametrize("argv", [
    ["train", "--resume", ""], ["train", "--preset", " "], ["train", "--out", ""],
    ["finetune", "RUN", "--out", ""], ["evaluate", "RUN", "--data", ""], ["evaluate", ""],
    ["export", "RUN", "--format", "onnx", "--out", ""], ["score", "RUN", ""],
    ["generate", "", "--prompt", "a"], ["ablate", "--plan", "", "--out", "o"],
    ["report", "RUN", "--reference", ""], ["report", "RUN", "--out", ""],
])
def test_an_empty_path_or_name_is_refused_not_taken_for_the_default(capsys, argv, tmp_path,
                                                                     monkeypatch):
    """`--resume "$RUN"` with RUN unset must not start a new run of the default preset."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and ": is empty (see lstmlm " in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["evaluate", "x" * 300], ["train", "--resume", "x" * 300],
                                     ["report", "x" * 300]])
def test_a_name_too_long_for_the_file_system_is_one_line(capsys, command):
    code, _, err = run(capsys, *command)
    assert code == 1 and err == f"lstmlm: error: {'x' * 300}: File name too long\n"


def test_running_out_of_python_memory_is_one_line(capsys, monkeypatch):
    def no_memory():
        raise MemoryError

    monkeypatch.setattr("lstmlm.cli.list_presets", no_memory)
    code, _, err = run(capsys, "presets")
    assert code == 1 and err == "lstmlm: error: out of memory (MemoryError); use a smaller " \
                                "model, batch size or input\n"


def test_the_console_script_prints_no_traceback(tmp_path):
    env = {**os.environ, "LSTMLM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "lstmlm", "evaluate", "missing"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == "lstmlm: error: missing: no such run directory\n"


# Ctrl-C while the command imports torch, as a finder that raises where the import would begin.
INTERRUPTED_IMPORT = """
import sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
from lstmlm.__main__ import run
sys.exit(run())
"""


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "lstmlm: interrupted\n")


def test_importing_the_package_leaves_torch_for_first_use(tmp_path):
    probe = ("import sys, lstmlm; before = 'torch' in sys.modules; lstmlm.Config; "
             "listed = set(lstmlm.__all__) <= set(dir(lstmlm)); "
             "print(before, 'torch' in sys.modules, listed, lstmlm.load.__module__)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.stdout == "False False True lstmlm.api\n", proc.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lstmlm.nope


def test_the_lstmlm_command_is_the_interrupt_safe_entry():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="lstmlm")
    assert script.value == "lstmlm.__main__:run"


# ---- the README's commands ----------------------------------------------------------------------

def readme_commands() -> list[list[str]]:
    """The arguments of every `lstmlm ...` (or `-m lstmlm ...`) command in the README's bash
    blocks."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if "lstmlm" in words and words[-1] != "--version":
                    commands.append(words[words.index("lstmlm") + 1:])
    return commands


def test_the_readme_has_commands_to_check():
    commands = readme_commands()
    assert len(commands) >= 15 and ["report", "runs/a", "runs/b", "--out", "compare/"] in commands


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_every_command_in_the_readme_parses(argv):
    """Flags, presets, plans and settings that the README shows exist (nothing is run)."""
    args = build_parser().parse_args(argv)  # a wrong flag exits with status 2
    if hasattr(args, "set"):
        config_overrides(args)
    if getattr(args, "preset", None):
        load_preset(args.preset)
    if getattr(args, "plan", None):
        load_plan(args.plan)
