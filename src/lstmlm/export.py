"""Export a trained model for inference without lstmlm: TorchScript or ONNX, with the LSTM state
as explicit inputs and outputs so that the caller can carry it from call to call.

    forward(tokens, h0, c0, h1, c1, ...) -> (logits, h0_out, c0_out, h1_out, c1_out, ...)

tokens: (time, batch) int64 ids (RUN_DIR/vocab.txt, line i is id i); each h_i, c_i: (1, batch,
size of layer i), zeros for a fresh start; logits: (time, batch, vocab). The layers may have
different sizes, so each one's state is its own input rather than one stacked tensor. Time
and batch are dynamic in both formats.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .errors import LstmlmError
from .fileio import atomic_write
from .model import LSTMLM

FORMATS = ("torchscript", "onnx")


class StatefulLM(nn.Module):
    """The model with its hidden state flattened to tensors, as exporters need."""

    def __init__(self, model: LSTMLM):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, *states: torch.Tensor):
        hidden = [(states[2 * i], states[2 * i + 1]) for i in range(len(states) // 2)]
        logits, hidden = self.model(tokens, hidden)
        return (logits, *[t for h, c in hidden for t in (h, c)])


def state_names(model: LSTMLM) -> list[str]:
    return [f"{kind}{i}" for i in range(len(model.layers)) for kind in ("h", "c")]


def check_export(fmt: str, out: Path) -> None:
    """Refuse an unknown format or an --out that cannot be written, before any work."""
    if fmt not in FORMATS:
        raise LstmlmError(f"unknown export format {fmt!r}; choose {' or '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        name = "model.pt" if fmt == "torchscript" else "model.onnx"
        raise LstmlmError(f"--out {out}: is a directory; give a file name, e.g. {out / name}")
    if not out.parent.is_dir():
        raise LstmlmError(f"--out {out}: directory {out.parent} does not exist")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  torch's TorchScript-based exporter writes through it
        except ImportError:
            raise LstmlmError("ONNX export needs the onnx package: pip install onnx (or, in a "
                              "checkout, pip install -e '.[onnx]')") from None


def example_inputs(model: LSTMLM, time: int = 3, batch: int = 2) -> tuple[torch.Tensor, ...]:
    tokens = torch.randint(model.vocab_size, (time, batch), device=model.embedding.weight.device)
    return (tokens, *[t for h, c in model.init_hidden(batch) for t in (h, c)])


def export_model(model: LSTMLM, fmt: str, out: Path, vocab_words: list[str] | None = None) -> Path:
    """Write `model` (put in eval mode) to `out` as TorchScript (traced; the vocabulary, if
    given, is stored inside as `vocab.txt`) or ONNX (needs the onnx package; onnxruntime
    runs the result)."""
    check_export(fmt, out)
    out = Path(out)
    wrapper = StatefulLM(model).eval()  # the ONNX exporter restores the wrapper's mode after
    args = example_inputs(model)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporters' deprecation and tracer notes, not for users
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, args)
            extra = {"vocab.txt": "\n".join(vocab_words) + "\n"} if vocab_words else {}
            torch.jit.save(traced, buffer, _extra_files=extra)
        else:
            names = state_names(model)
            batch = {1: "batch"}
            dynamic_axes = {"tokens": {0: "time", 1: "batch"}, "logits": {0: "time", 1: "batch"},
                            **{n: batch for n in names}, **{f"{n}_out": batch for n in names}}
            # dynamo=False: the TorchScript-based exporter, which needs onnx but not onnxscript.
            torch.onnx.export(wrapper, args, buffer, dynamo=False, input_names=["tokens", *names],
                              output_names=["logits", *[f"{n}_out" for n in names]],
                              dynamic_axes=dynamic_axes, opset_version=17)
    try:
        atomic_write(out, buffer.getvalue())
    except OSError as e:
        raise LstmlmError(f"--out {out}: cannot write ({e.strerror})") from None
    return out
