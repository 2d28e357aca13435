"""Helpers shared by the test modules."""

import functools
import io
import json
from pathlib import Path

from tqdm import tqdm

import lstmlm.evaluate

from lstmlm import checkpoint as ckpt
from lstmlm.cli import main

# A corpus just big enough for a tiny model: 7 words, 20 training lines.
GOOD_SPLITS = {"train": "a b c d\ne f a b\n" * 10, "valid": "a b c\n" * 5, "test": "d e f\n" * 5}


def run(capsys, *argv) -> tuple[int, str, str]:
    """The `lstmlm` command run in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def make_corpus(directory: Path, **splits) -> Path:
    """A data directory with GOOD_SPLITS, except: split=None (no file) or split=bytes/str."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, content in {**GOOD_SPLITS, **splits}.items():
        if content is None:
            continue
        path = directory / f"{split}.txt"
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
    return directory


def metrics(run_dir: Path) -> list[dict]:
    """The run's validation records (metrics.jsonl), every line whole."""
    return [json.loads(line) for line in (run_dir / ckpt.METRICS).read_text().splitlines()]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes, to check that a failed command changed nothing."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, where progress bars are drawn."""

    def isatty(self):
        return True


def draw_every_update(monkeypatch) -> None:
    """Progress bars (lstmlm.evaluate.progress_bar) draw every update, not a few a second, so
    that their last count shows."""
    monkeypatch.setattr(lstmlm.evaluate, "tqdm", functools.partial(tqdm, mininterval=0,
                                                                     miniters=1))
