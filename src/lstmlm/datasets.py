"""Named datasets: turn `--data X` into a local directory, downloading WikiText / PTB once.

`X` is either a directory holding train/valid/test files or a dataset name from `DATASETS`.
A named dataset is downloaded into `data_root()/NAME` the first time it is asked for. The
download is careful because a later run trusts whatever it finds there:

- only the three known archive members are read, each streamed into its own file (never
  `extractall`), so no path inside the archive can write outside the cache;
- every split is checked (sha256 when known, else its token count) before it is used;
- everything is built in a temporary directory beside the final one and renamed into place
  only when complete, so a failure or Ctrl-C leaves no half-written dataset behind.
"""

from __future__ import annotations

import gzip
import http.client
import os
import secrets
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .data import SPLITS, CorpusError, cache_root, count_tokens, find_split_files, sha256_file
from .errors import LstmlmError
from .fileio import fsync_dir

TIMEOUT = 30  # seconds to wait for the server to connect or send more data
CHUNK = 1 << 20
NO_NETWORK_HINT = ("no network? pass a local directory instead: "
                   "--data /path/to/dir with train.txt valid.txt test.txt")


class DownloadError(LstmlmError):
    """A dataset could not be downloaded, extracted or verified."""


@dataclass(frozen=True)
class Dataset:
    """Where a dataset comes from and how to check it."""

    url: str
    members: dict[str, str]  # archive member holding each split
    sha256: dict[str, str] | None  # expected sha256 of each split, if known
    tokens: dict[str, int]  # expected token count of each split (`<eos>` included)


DATASETS: dict[str, Dataset] = {
    "wikitext-2": Dataset(
        url="https://wikitext.smerity.com/wikitext-2-v1.zip",
        members={s: f"wikitext-2/wiki.{s}.tokens" for s in SPLITS},
        sha256={
            "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
        tokens={"train": 2_088_628, "valid": 217_646, "test": 245_569},
    ),
    "wikitext-103": Dataset(
        url="https://wikitext.smerity.com/wikitext-103-v1.zip",
        members={s: f"wikitext-103/wiki.{s}.tokens" for s in SPLITS},
        sha256=None,
        tokens={"train": 103_227_021, "valid": 217_646, "test": 245_569},
    ),
    "ptb": Dataset(
        url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        members={s: f"./simple-examples/data/ptb.{s}.txt" for s in SPLITS},
        sha256={
            "train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "valid": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
        tokens={"train": 929_589, "valid": 73_760, "test": 82_430},
    ),
}


def data_root() -> Path:
    """Where named datasets live: `$LSTMLM_DATA`, else `cache_root()/data`."""
    if os.environ.get("LSTMLM_DATA"):
        return Path(os.environ["LSTMLM_DATA"]).expanduser()
    return cache_root() / "data"


def _is_complete(directory: Path) -> bool:
    """Whether `directory` holds the three splits (train.txt ... or wiki.train.tokens ...)."""
    try:
        find_split_files(directory)
    except CorpusError:
        return False
    return True


def recorded_data(spec: str) -> str:
    """What a run records as its data: an existing directory or file as an absolute path, so
    that the run can be evaluated or resumed from any folder; a dataset name as it is (unless a
    folder of that name here holds the splits: resolve_data reads that one)."""
    path = Path(spec).expanduser()
    if spec in DATASETS and not _is_complete(path):
        return spec
    return str(path.resolve()) if spec and (path.is_dir() or path.is_file()) else spec


def resolve_data(spec: str, recorded: bool = False) -> Path:
    """The data directory or text file that `--data spec` names, downloading a named dataset
    if needed.

    A dataset name means the local folder of that name only if it holds the splits; a
    `recorded` spec comes from a run's config.json, where directories are absolute paths, so a
    bare dataset name there is always the dataset (the folder may be the run directory itself).
    """
    if not spec.strip():
        raise LstmlmError("--data is empty; pass a data directory or a dataset name "
                          f"({', '.join(DATASETS)})")
    if spec in DATASETS and (recorded or not _is_complete(Path(spec))):
        directory = data_root() / spec
        return directory if _is_complete(directory) else download_dataset(spec)
    path = Path(spec).expanduser()
    if path.is_dir() or path.is_file():
        return path
    if path.exists():
        raise LstmlmError(
            f"--data {spec}: not a regular file or directory; pass a text file, a directory "
            f"holding train.txt valid.txt test.txt, or a dataset name ({', '.join(DATASETS)})")
    raise LstmlmError(
        f"--data {spec}: no such file or directory, and not a known dataset name "
        f"({', '.join(DATASETS)}); pass a text file, or a directory holding train.txt "
        "valid.txt test.txt")


def download_dataset(name: str, root: Path | None = None, url: str | None = None) -> Path:
    """Download, extract and verify dataset `name` into `root/name`; returns that directory.

    `url` overrides the table's address (a mirror, or a local server in tests). Nothing is
    left in `root` unless every split was verified.
    """
    if name not in DATASETS:
        raise LstmlmError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    dataset = DATASETS[name]
    root = Path(root) if root is not None else data_root()
    url = url or dataset.url
    final = root / name
    if _is_complete(final):
        return final
    if final.exists():
        raise DownloadError(
            f"{final} exists but does not hold train.txt valid.txt test.txt (or "
            "wiki.train.tokens ...); move it away and try again")
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its 0700 mode would stick to the final directory.
        tmp = root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir()
        try:
            archive = tmp / "archive"
            _fetch(url, archive, name)
            _extract(archive, dataset.members, tmp, name, url)
            archive.unlink()
            for split in SPLITS:
                _verify(tmp / f"{split}.txt", split, dataset, name)
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)  # atomic: `final` appears complete or not at all
            except OSError:
                if not _is_complete(final):  # unless another process just finished the job
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(root)
    except OSError as e:  # a full disk, a read-only folder, LSTMLM_DATA naming a file
        raise DownloadError(
            f"cannot store {name} in {root} ({e.strerror or e}); free some space or point "
            "LSTMLM_DATA at a writable folder") from None
    return final


def _network_error(name: str, url: str, error: Exception) -> DownloadError:
    """The one-line error for a failed download, with the way out (a local directory)."""
    if isinstance(error, urllib.error.HTTPError):
        reason = f"HTTP {error.code} {error.reason}"
    else:
        reason = getattr(error, "reason", None) or error
    reason = " ".join(str(reason).split()) or type(error).__name__  # one line
    return DownloadError(f"could not download {name} from {url} ({reason}); {NO_NETWORK_HINT}")


def _fetch(url: str, dest: Path, name: str) -> None:
    """Stream `url` into the file `dest`, with a progress bar in bytes."""
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
        raise _network_error(name, url, e) from None
    with response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"downloading {name}", disable=None) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _network_error(name, url, e) from None
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _network_error(name, url, ValueError(
            f"connection closed after {received:,} of {total:,} bytes"))


def _find_member(names: list[str], member: str) -> str | None:
    """The archive entry named `member`, with or without a leading "./"."""
    def strip(n):
        return n[2:] if n.startswith("./") else n
    return next((n for n in names if strip(n) == strip(member)), None)


def _extract(archive: Path, members: dict[str, str], dest: Path, name: str, url: str) -> None:
    """Stream each split's member of a zip or tar(.gz) archive into `dest/{split}.txt`."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                entries = {n: n for n in z.namelist() if not n.endswith("/")}
                _copy_members(entries, z.open, members, dest, name)
            return
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:  # any compression, detected from the content
                entries = {m.name: m for m in tar.getmembers() if m.isfile()}
                _copy_members(entries, tar.extractfile, members, dest, name)
            return
        problem = "it is neither a zip nor a tar archive"
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        problem = "the archive is damaged (" + " ".join(str(e).split()) + ")"
    raise DownloadError(
        f"{name}: cannot extract the file downloaded from {url}: {problem}; "
        "try again, or pass --data /path/to/dir")


def _copy_members(entries: dict, open_entry, members: dict[str, str], dest: Path,
                 name: str) -> None:
    """Copy each split's entry (opened with `open_entry`) into `dest/{split}.txt`, fsynced."""
    for split, member in members.items():
        found = _find_member(list(entries), member)
        if found is None:
            raise DownloadError(
                f"{name}: the archive has no {member} (the {split} split); "
                "the download is not the expected dataset")
        with open_entry(entries[found]) as src, open(dest / f"{split}.txt", "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())


def _verify(path: Path, split: str, dataset: Dataset, name: str) -> None:
    """Check one extracted split against its sha256 (when known) or its token count."""
    if dataset.sha256 is not None:
        expected, actual = dataset.sha256[split], sha256_file(path)
        if actual != expected:
            raise DownloadError(
                f"{name}: the {split} split failed its sha256 checksum (expected {expected}, "
                f"got {actual}); the download is damaged or the file changed upstream")
        return
    try:
        actual = count_tokens(path)
    except CorpusError as e:
        raise DownloadError(f"{name}: the {split} split is not usable text ({e})") from None
    expected = dataset.tokens[split]
    if actual != expected:
        raise DownloadError(
            f"{name}: the {split} split has {actual:,} tokens, expected {expected:,}; "
            "the download is damaged or the file changed upstream")
