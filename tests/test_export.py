"""Export: TorchScript and ONNX files compute what the model computes, state in and out."""

import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lstmlm.config import Config
from lstmlm.export import export_model, state_names
from lstmlm.model import LSTMLM
from tests.helpers import run, snapshot


@pytest.fixture(scope="module")
def model() -> LSTMLM:
    """Three layers of three different sizes, as AWD-LSTM's are."""
    torch.manual_seed(0)
    cfg = Config(embedding_size=6, hidden_size=10, num_layers=3, last_hidden_size=7)
    return LSTMLM(cfg, 23).eval()


def inputs(model, time=5, batch=4):
    """Tokens and a non-zero state, of another shape than the one the export traced."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(model.vocab_size, (time, batch), generator=generator)
    hidden = [(torch.randn(1, batch, layer.hidden_size, generator=generator) * 0.5,
               torch.randn(1, batch, layer.hidden_size, generator=generator) * 0.5)
              for layer in model.layers]
    return tokens, hidden


def expected(model, tokens, hidden) -> list[torch.Tensor]:
    with torch.no_grad():
        logits, hidden = model(tokens, hidden)
    return [logits, *[t for h, c in hidden for t in (h, c)]]


def flat(hidden) -> list[torch.Tensor]:
    return [t for h, c in hidden for t in (h, c)]


def load_torchscript(path: Path, files: dict | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), _extra_files=files or {})


def test_torchscript_matches_the_model(model, tmp_path):
    path = export_model(model, "torchscript", tmp_path / "m.pt", [f"w{i}" for i in range(23)])
    files = {"vocab.txt": ""}
    exported = load_torchscript(path, files)
    assert files["vocab.txt"].decode().split("\n")[:2] == ["w0", "w1"]
    for time, batch in [(5, 4), (1, 1)]:
        tokens, hidden = inputs(model, time, batch)
        with torch.no_grad():
            got = exported(tokens, *flat(hidden))
        want = expected(model, tokens, hidden)
        assert [t.shape for t in got] == [t.shape for t in want]
        for g, w in zip(got, want):
            assert torch.allclose(g, w, atol=1e-5)
    assert not model.training


def test_onnx_matches_the_model(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export_model(model, "onnx", tmp_path / "m.onnx")
    assert not model.training  # the exporter restores the mode it found
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = state_names(model)
    assert [i.name for i in session.get_inputs()] == ["tokens", *names]
    assert [o.name for o in session.get_outputs()] == ["logits", *[f"{n}_out" for n in names]]
    for time, batch in [(5, 4), (1, 1)]:
        tokens, hidden = inputs(model, time, batch)
        feed = {"tokens": tokens.numpy(), **{n: t.numpy() for n, t in zip(names, flat(hidden))}}
        got = session.run(None, feed)
        for g, w in zip(got, expected(model, tokens, hidden)):
            assert g.shape == tuple(w.shape)
            assert torch.allclose(torch.from_numpy(g), w, atol=1e-5)


# ---- CLI --------------------------------------------------------------------------------------


def test_export_a_run(capsys, lm, tiny_run, tmp_path):
    run_dir = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code, out, err = run(capsys, "export", run_dir, "--format", "torchscript",
                         "--out", tmp_path / "lm.pt")
    assert code == 0 and err == "" and out.startswith(f"wrote {tmp_path / 'lm.pt'}")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    files = {"vocab.txt": ""}
    exported = load_torchscript(tmp_path / "lm.pt", files)
    assert files["vocab.txt"].decode() == (run_dir / "vocab.txt").read_text()
    tokens, hidden = inputs(lm.model, 4, 2)
    with torch.no_grad():
        got = exported(tokens, *flat(hidden))
    for g, w in zip(got, expected(lm.model, tokens, hidden)):
        assert torch.allclose(g, w, atol=1e-5)


def test_onnx_export_without_onnx(capsys, monkeypatch, tiny_run, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    code, out, err = run(capsys, "export", tiny_run, "--format", "onnx", "--out", tmp_path / "m")
    assert code == 1 and err == ("lstmlm: error: ONNX export needs the onnx package: pip install "
                                 "onnx (or, in a checkout, pip install -e '.[onnx]')\n")
    assert not (tmp_path / "m").exists()


def test_a_failed_write_keeps_the_old_file(capsys, monkeypatch, tiny_run, tmp_path):
    (tmp_path / "m.pt").write_bytes(b"old")

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lstmlm.export.atomic_write", full_disk)
    code, out, err = run(capsys, "export", tiny_run, "--format", "torchscript",
                         "--out", tmp_path / "m.pt")
    assert code == 1 and "cannot write (No space left on device)" in err
    assert (tmp_path / "m.pt").read_bytes() == b"old"


def test_an_export_never_replaces_the_runs_own_files(capsys, tiny_run):
    before = snapshot(tiny_run)
    for name in ("model.safetensors", "config.json"):
        code, _, err = run(capsys, "export", tiny_run, "--format", "torchscript", "--out",
                           tiny_run / ".." / tiny_run.name / name)
        assert code == 1 and "is one of the run's own files" in err
    assert snapshot(tiny_run) == before


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite", "--out", "{tmp}/m.x"], "unknown export format 'tflite'"),
    (["--format", "onnx", "--out", "{tmp}"], "is a directory"),
    (["--format", "onnx", "--out", "{tmp}/no/m.onnx"], "does not exist"),
    (["--format", "torchscript", "--out", "{tmp}/file.txt/m.pt"], "does not exist"),
])
def test_export_mistakes(capsys, tiny_run, tmp_path, args, message):
    (tmp_path / "file.txt").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    code, out, err = run(capsys, "export", tiny_run, *args)
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("lstmlm: error: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
