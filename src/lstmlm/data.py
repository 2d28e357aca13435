"""Word-level corpora: reading, vocabulary, a tokenized-corpus cache, and batching.

The conventions are those of the classic WikiText-2 / Penn Treebank setup (pytorch/examples
`word_language_model`, salesforce `awd-lstm-lm`): each line is split on whitespace and ends with
one `<eos>` token, empty lines included. The vocabulary comes from the training split; words
of valid/test that training never saw become `<unk>`, and so do training words seen fewer than
`min_count` times (1 by default, as in the reference code: every training word is kept) and,
with `max_vocab`, all but the most frequent words. A corpus is a directory of three split
files, or one text file cut by lines (`split_file`).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import sys
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from .errors import LstmlmError
from .fileio import atomic_write

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
# File names accepted for each split inside a data directory, in order of preference.
SPLIT_FILES = {split: (f"{split}.txt", f"wiki.{split}.tokens") for split in SPLITS}
CACHE_FORMAT = 2  # 2: a UTF-8 byte-order mark is no longer part of the first word
# Most lines in each of the valid and test parts of one text file (split_file): WikiText's
# valid and test splits have 3,760 and 4,358 lines.
HELD_OUT_LINES = 5000


class CorpusError(LstmlmError):
    """A data file or directory that cannot be used as a corpus."""


def cache_root() -> Path:
    """Where lstmlm keeps downloaded datasets and tokenized corpora (`$LSTMLM_CACHE`)."""
    if os.environ.get("LSTMLM_CACHE"):  # set and not empty
        return Path(os.environ["LSTMLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "lstmlm"


def read_text(source) -> str:
    """The UTF-8 text of a file (`-`: standard input), without a byte-order mark, with one
    clear error for anything that is not text."""
    name = "stdin" if str(source) == "-" else str(source)
    if name == "stdin" and sys.stdin is None:
        raise CorpusError("stdin is closed; pass a file, or pipe the text in")
    raw = bytearray()  # grown a megabyte at a time: a NUL stops /dev/zero before memory runs out
    try:
        with (contextlib.nullcontext(sys.stdin.buffer) if str(source) == "-"
              else open(source, "rb")) as f:
            while chunk := f.read(1 << 20):
                if b"\x00" in chunk:
                    raise CorpusError(f"{name}: looks like a binary file (contains NUL bytes); "
                                      "pass plain UTF-8 text")
                raw += chunk
                if len(chunk) < 1 << 20:  # the end (on a terminal, one Ctrl-D)
                    break
    except FileNotFoundError:
        raise CorpusError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise CorpusError(f"{name}: is a directory, expected a text file") from None
    except OSError as e:
        raise CorpusError(f"{name}: cannot read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + (3 if raw.startswith(codecs.BOM_UTF8) else 0)  # e.start is after a BOM
        raise CorpusError(
            f"{name}: not UTF-8 text (invalid byte 0x{raw[at]:02x} at offset {at}); "
            "convert it to UTF-8, e.g. with iconv") from None


def read_lines(path: Path) -> Iterator[list[str]]:
    """Words of each line of a UTF-8 text file, a line at a time; a clear error (at once) for
    anything that is not text."""
    return (line.split() for line in text_lines(path))


def text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file that has words in it. A corpus keeps its lines as strings
    and splits one at a time: a list of every line's words costs 10-15 x the text's size."""
    text = read_text(path)
    if not text.strip():
        raise CorpusError(f"{path}: contains no words; every split needs some text")
    return split_lines(text)


def split_lines(text: str) -> list[str]:
    """Lines as Python's text mode reads them (\n, \r\n, \r; a final line break adds no line).

    Not str.splitlines(), which also breaks on form feeds and other separators that the
    reference code keeps inside lines. An empty text is one empty line.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    return lines


def count_tokens(path: Path) -> int:
    """Number of tokens in a file, `<eos>` included (one per line)."""
    return sum(len(words) + 1 for words in read_lines(path))


def find_split_files(directory: Path) -> dict[str, Path]:
    """The train/valid/test files of a data directory, by split name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CorpusError(f"{directory}: no such directory")
    found = {}
    for split, names in SPLIT_FILES.items():
        path = next((directory / n for n in names if (directory / n).is_file()), None)
        odd = next((directory / n for n in names if (directory / n).exists()), None)
        if path is None and odd is not None:
            raise CorpusError(f"{odd}: not a regular file (a directory, pipe or device); the "
                              f"{split} split must be a text file")
        if path is None:
            raise CorpusError(
                f"{directory}: missing the {split} split; expected a file named "
                f"{' or '.join(names)}")
        found[split] = path
    return found


def split_file(path: Path) -> dict[str, list[str]]:
    """One text file as a corpus: its lines in order, the last twentieth for the test, the
    twentieth before it for validation, the rest for training; each held-out part at least one
    line and at most HELD_OUT_LINES, so that validating a large corpus stays quick.
    Contiguous parts, as in WikiText and PTB, not lines drawn at random: held-out lines would
    otherwise sit between training lines of the same documents."""
    lines = text_lines(path)
    if len(lines) < 3:
        raise CorpusError(
            f"{path}: {len(lines)} line(s); one text file is cut by lines into train, valid and "
            "test, so it needs at least 3 (better thousands); or pass a directory holding "
            "train.txt valid.txt test.txt")
    held_out = max(1, min(len(lines) // 20, HELD_OUT_LINES))
    valid = len(lines) - 2 * held_out
    return {"train": lines[:valid], "valid": lines[valid:-held_out], "test": lines[-held_out:]}


def read_splits(data: Path) -> dict[str, list[str]]:
    """The lines of the three splits of `--data`: a data directory's files, or one text file
    cut by `split_file`."""
    if Path(data).is_file():
        return split_file(data)
    return {split: text_lines(path) for split, path in find_split_files(data).items()}


def read_split(data: Path, split: str) -> tuple[str, list[str]]:
    """(where the split's text comes from, for messages; its lines) for `--data`: a data
    directory's file for the split, or the split's part of one text file (`split_file`)."""
    if Path(data).is_file():
        return f"{data} ({split} part)", split_file(data)[split]
    path = find_split_files(data)[split]
    return str(path), text_lines(path)


class Vocab:
    """Word <-> id mapping. Ids are sorted by training frequency (most frequent first)."""

    def __init__(self, words: list[str]):
        if len(set(words)) != len(words):
            raise LstmlmError("vocabulary has duplicate words")
        if UNK not in words or EOS not in words:
            raise LstmlmError(f"vocabulary must contain {EOS} and {UNK}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.unk_id = self.index[UNK]
        self.eos_id = self.index[EOS]

    @classmethod
    def from_lines(cls, lines: Iterable[list[str]], min_count: int = 1,
                   max_vocab: int = 0) -> "Vocab":
        """The vocabulary of the words of `lines`, read once. Words seen fewer than
        `min_count` times are left out, and with `max_vocab` all but the most frequent words
        (`max_vocab` words in all, `<eos>` and `<unk>` included); their occurrences count as
        `<unk>`'s, so that `<unk>` takes the place its frequency earns."""
        counts, num_lines = Counter(), 0
        for words in lines:
            counts.update(words)
            num_lines += 1
        counts[EOS] += num_lines
        counts.setdefault(UNK, 0)
        if min_count > 1:
            rare = [w for w, n in counts.items() if n < min_count and w not in (EOS, UNK)]
            counts[UNK] += sum(counts.pop(w) for w in rare)
        if max_vocab and len(counts) > max_vocab:
            ranked = [w for w, _ in counts.most_common() if w not in (EOS, UNK)]
            counts[UNK] += sum(counts.pop(w) for w in ranked[max_vocab - 2:])
        # Counter.most_common keeps first-seen order among equal counts: deterministic.
        return cls([w for w, _ in counts.most_common()])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, lines: Iterable[list[str]]) -> tuple[torch.Tensor, int]:
        """Token ids of the lines with `<eos>` after each, and how many words were unknown.
        The ids gather in an int64 array, 8 bytes each (a list of Python ints takes ~4 x)."""
        ids, unknown = array("q"), 0
        get, unk, eos = self.index.get, self.unk_id, self.eos_id
        for words in lines:
            row = [get(w, unk) for w in words]
            unknown += row.count(unk) - words.count(UNK)  # a literal <unk> is a known word
            ids.extend(row)
            ids.append(eos)
        return torch.from_numpy(np.frombuffer(ids, dtype=np.int64)), unknown

    def decode(self, ids) -> list[str]:
        return [self.words[i] for i in ids]

    def save(self, path: Path) -> None:
        atomic_write(path, ("\n".join(self.words) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        text = Path(path).read_text(encoding="utf-8")
        # Words never contain whitespace, so one per line (split on "\n" only) is lossless.
        return cls(text.split("\n")[:-1])


@dataclass
class Corpus:
    """A vocabulary and the token ids of the three splits."""

    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    unknown: dict[str, int]  # words mapped to <unk>: unseen in training, or left out of it

    def split(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def summary(self) -> str:
        parts = [f"vocabulary {len(self.vocab):,}"]
        for s in SPLITS:
            parts.append(f"{s} {self.split(s).numel():,} tokens")
        text = ", ".join(parts)
        unknown = {s: n for s, n in self.unknown.items() if n}
        if unknown:
            text += "; words outside the vocabulary mapped to <unk>: " + ", ".join(
                f"{s} {n:,}" for s, n in unknown.items())
        return text


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _data_digest(data: Path, min_count: int, max_vocab: int) -> str:
    h = hashlib.sha256(f"lstmlm-corpus-{CACHE_FORMAT}".encode())
    if min_count > 1:  # the defaults keep the key from before these settings existed
        h.update(f"min_count {min_count}".encode())
    if max_vocab:
        h.update(f"max_vocab {max_vocab}".encode())
    if data.is_file():
        h.update(f"one file, cut by split_file, held-out parts <= {HELD_OUT_LINES}".encode())
        h.update(bytes.fromhex(sha256_file(data)))
        return h.hexdigest()
    files = find_split_files(data)
    for split in SPLITS:
        h.update(split.encode())
        h.update(bytes.fromhex(sha256_file(files[split])))
    return h.hexdigest()


def tokenize(data: Path, min_count: int = 1, max_vocab: int = 0) -> Corpus:
    """Read and encode the three splits of a data directory or of one text file (no cache)."""
    lines = read_splits(data)
    vocab = Vocab.from_lines((line.split() for line in lines["train"]), min_count, max_vocab)
    encoded = {split: vocab.encode(line.split() for line in lines[split]) for split in SPLITS}
    return Corpus(vocab, *(encoded[s][0] for s in SPLITS),
                  unknown={s: encoded[s][1] for s in SPLITS})


def load_corpus(data: Path, min_count: int = 1, max_vocab: int = 0) -> Corpus:
    """Tokenize a data directory or one text file, through a cache keyed by the files' sha256,
    `min_count` and `max_vocab`.

    The cache lives under `cache_root()/tokenized`; when it cannot be written (read-only home,
    full disk) the corpus is simply tokenized again next time.
    """
    data = Path(data)
    digest = _data_digest(data, min_count, max_vocab)
    cache_file = cache_root() / "tokenized" / f"{digest}.safetensors"
    if cache_file.is_file():
        try:
            return _read_cache(cache_file)
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    corpus = tokenize(data, min_count, max_vocab)
    _write_cache(cache_file, corpus)
    return corpus


def _write_cache(path: Path, corpus: Corpus) -> None:
    tensors = {s: corpus.split(s) for s in SPLITS}
    meta = {"vocab": json.dumps(corpus.vocab.words), "unknown": json.dumps(corpus.unknown)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, safetensors.torch.save(tensors, metadata=meta))
    except OSError:
        pass


def _read_cache(path: Path) -> Corpus:
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        splits = [f.get_tensor(s) for s in SPLITS]
    return Corpus(Vocab(json.loads(meta["vocab"])), *splits, unknown=json.loads(meta["unknown"]))


def batchify(data: torch.Tensor, batch_size: int, what: str = "the split",
             setting: str = "batch size") -> torch.Tensor:
    """Cut a 1-D token stream into `batch_size` parallel streams: shape (length, batch_size).

    Column j holds the j-th contiguous slice of the corpus; trailing tokens that do not fill a
    row are dropped, as in the reference code. `what` and `setting` name the data and the
    option for the error when the data is too short.
    """
    length = data.numel() // batch_size
    if length < 2:
        raise CorpusError(
            f"{what} has {data.numel()} tokens, too few for {setting} {batch_size}; "
            f"use a smaller {setting} or more data")
    return data[: length * batch_size].view(batch_size, length).t().contiguous()


def get_batch(source: torch.Tensor, i: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs rows i..i+seq_len-1 and the targets one step later (flattened)."""
    seq_len = min(seq_len, source.size(0) - 1 - i)
    inputs = source[i: i + seq_len]
    targets = source[i + 1: i + 1 + seq_len].reshape(-1)
    return inputs, targets
