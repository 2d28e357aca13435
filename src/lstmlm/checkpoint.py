"""Run directories: what is saved, how it is saved safely, and how it is loaded back.

    RUN_DIR/
      config.json         format version, vocabulary size and the full resolved Config
      vocab.txt           one word per line; line i is token id i
      model.safetensors   best weights so far (lowest validation loss)
      state.safetensors   everything `--resume` needs: last weights, optimizer state, RNG state,
                          hidden state, and the trainer's counters (JSON in the file's metadata)
      metrics.jsonl       one JSON object per validation
      results.json        final summary: best validation, test perplexity of the best weights
      .lock               held (flock) by the one process that trains into the directory

Every file is written to a temporary name, fsynced and renamed, so a run killed at any moment
keeps its previous good files (metrics.jsonl is appended to instead; a resume drops a line a
kill cut short). Nothing here unpickles: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from .config import Config, ConfigError
from .data import Vocab
from .errors import LstmlmError
from .fileio import atomic_write
from .model import LSTMLM, pick_device

FORMAT_VERSION = 1
CONFIG = "config.json"
VOCAB = "vocab.txt"
WEIGHTS = "model.safetensors"
STATE = "state.safetensors"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
LOCK = ".lock"
RUN_FILES = (CONFIG, VOCAB, WEIGHTS, STATE, METRICS, RESULTS, LOCK)


class RunDirError(LstmlmError):
    """A run directory that is missing, incomplete, damaged or from a newer lstmlm."""


def write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, save_safetensors_bytes(tensors, metadata=metadata))


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a safetensors file; a clear error if it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RunDirError(
            f"{path}: damaged or not a safetensors file ({str(e).splitlines()[0]}); "
            "restore it or retrain") from None
    return tensors, metadata


@contextlib.contextmanager
def locked(run_dir: Path):
    """Train into `run_dir` (created if new) as its only writer. A second process training
    into it, a second `--resume` of a run still going or two runs given one --out, would mix
    its checkpoints and metrics with the first's. The kernel releases the lock when the holder
    ends, even by SIGKILL, so a crash never leaves a run locked."""
    run_dir = Path(run_dir)
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"{run_dir} exists and is not a directory; choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK, "a")
    except OSError as e:
        raise RunDirError(f"cannot write run directory {run_dir}: {e.strerror}") from None
    import fcntl  # POSIX only: importing lstmlm for inference needs no lock

    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"{run_dir} is in use: another lstmlm process is training into it; let it "
                "finish or stop it (Ctrl-C saves a checkpoint), or choose another --out") from None
        except OSError:  # a file system without locks (some network ones): train unguarded
            pass
        yield


def create_run_dir(run_dir: Path, cfg: Config, vocab: Vocab) -> None:
    """A new run's config and vocabulary, in a directory `locked` made; refuses to overwrite
    another run."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).exists():
        raise RunDirError(
            f"{run_dir} already holds a run; continue it with `lstmlm train --resume {run_dir}` "
            "or choose another --out")
    try:
        vocab.save(run_dir / VOCAB)
        write_config(run_dir, cfg, len(vocab))
    except OSError as e:
        raise RunDirError(f"cannot write run directory {run_dir}: {e.strerror}") from None


def write_config(run_dir: Path, cfg: Config, vocab_size: int) -> None:
    write_json(Path(run_dir) / CONFIG, {"format_version": FORMAT_VERSION,
                                        "vocab_size": vocab_size, "config": cfg.to_dict()})


def recorded_run(spec: str) -> str:
    """A run directory as a config records it (`init_from`): an absolute path, so that it
    names the same run from any folder."""
    return str(Path(spec).expanduser().resolve()) if spec else spec


def read_run_config(run_dir: Path) -> tuple[Config, int]:
    """The Config and vocabulary size of a run directory, with clear errors for bad ones."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not an lstmlm run directory (no {CONFIG})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        version = data["format_version"]
        values, vocab_size = data["config"], data["vocab_size"]
    except (ValueError, KeyError, TypeError):
        values = None
    if not isinstance(values, dict) or type(vocab_size) is not int or vocab_size < 1:
        raise RunDirError(f"{path}: damaged (not the JSON lstmlm writes)")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RunDirError(
            f"{run_dir} was written by a newer lstmlm (format {version}, this one reads "
            f"{FORMAT_VERSION}); upgrade lstmlm")
    try:
        cfg = Config.from_dict(values, source=str(path))
    except ConfigError as e:
        raise RunDirError(str(e)) from None
    return cfg, vocab_size


def read_vocab(run_dir: Path, vocab_size: int) -> Vocab:
    path = Path(run_dir) / VOCAB
    try:
        vocab = Vocab.load(path)
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing") from None
    except (LstmlmError, UnicodeDecodeError, OSError):
        raise RunDirError(f"{path}: damaged vocabulary file") from None
    if len(vocab) != vocab_size:
        raise RunDirError(
            f"{path}: {len(vocab)} words but {CONFIG} says {vocab_size}; the run directory is "
            "inconsistent")
    return vocab


def model_tensors(model: LSTMLM) -> dict[str, torch.Tensor]:
    """The weights to save: each parameter once (a tied embedding/decoder matrix is stored
    under its first name only, as safetensors refuses shared storage)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def load_weights(model: LSTMLM, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else
                  f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the config implies "
                  f"{tuple(expected[wrong[0]].shape)}")
        raise RunDirError(f"{source}: weights do not match {CONFIG} ({detail})")
    model.load_state_dict(tensors, strict=False)  # strict would ask for the tied copy too


def load_run(run_dir: Path, device: str = "cpu") -> tuple[Config, Vocab, LSTMLM]:
    """Config, vocabulary and model (best weights, eval mode, on `device`: cpu, cuda or auto)
    of a run directory."""
    run_dir = Path(run_dir).expanduser()
    device = pick_device(device)
    cfg, vocab_size = read_run_config(run_dir)
    vocab = read_vocab(run_dir, vocab_size)
    path = run_dir / WEIGHTS
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {WEIGHTS} yet (training has not validated once)")
    with torch.random.fork_rng(devices=[]):  # its random initial weights are overwritten
        model = LSTMLM(cfg, vocab_size)
    load_weights(model, read_tensors(path)[0], path)
    return cfg, vocab, model.to(device).eval()
