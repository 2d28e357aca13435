"""Dataset download against a real local HTTP server serving archives built from the real corpora."""

import dataclasses
import functools
import io
import os
import socket
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lstmlm import datasets
from lstmlm.data import SPLITS
from lstmlm.datasets import Dataset, DownloadError, download_dataset, resolve_data
from lstmlm.errors import LstmlmError

WT2_MEMBERS = {s: f"wikitext-2/wiki.{s}.tokens" for s in SPLITS}
PTB_MEMBERS = {s: f"./simple-examples/data/ptb.{s}.txt" for s in SPLITS}
TINY = {"train": "a b c\nd e\n", "valid": "a b\n", "test": "c\n\n"}  # 7, 3 and 3 tokens


def need(shared_data: Path, name: str) -> Path:
    directory = shared_data / name
    if not all((directory / f"{s}.txt").is_file() for s in SPLITS):
        message = f"{directory} does not hold train.txt valid.txt test.txt"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return directory


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for member, data in members.items():
            z.writestr(member, data)


def write_tgz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class QuietHandler(SimpleHTTPRequestHandler):
    requests = []  # paths asked for, to check that nothing was downloaded again

    def log_message(self, *args):
        QuietHandler.requests.append(self.path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data):
    """Serve the archives below; yields the base URL."""
    wt2 = {s: (need(shared_data, "wikitext-2") / f"{s}.txt").read_bytes() for s in SPLITS}
    ptb = {s: (need(shared_data, "ptb") / f"{s}.txt").read_bytes() for s in SPLITS}
    corrupt = wt2["train"].replace(b" the ", b" thy ", 1)
    assert corrupt != wt2["train"]

    www = tmp_path_factory.mktemp("www")
    write_zip(www / "wt2.zip", {WT2_MEMBERS[s]: wt2[s] for s in SPLITS})
    write_zip(www / "wt2-corrupt.zip", {**{WT2_MEMBERS[s]: wt2[s] for s in SPLITS},
                                        WT2_MEMBERS["train"]: corrupt})
    write_zip(www / "wt2-no-test.zip", {WT2_MEMBERS[s]: wt2[s] for s in ("train", "valid")})
    # Like the real simple-examples.tgz: other files around, plus a member that would escape.
    extra = {"./simple-examples/README": b"readme\n", "../escape.txt": b"gotcha\n"}
    write_tgz(www / "ptb.tgz", {**extra, **{PTB_MEMBERS[s]: ptb[s] for s in SPLITS}})
    write_tgz(www / "ptb-noprefix.tgz", {PTB_MEMBERS[s][2:]: ptb[s] for s in SPLITS})
    write_zip(www / "tiny.zip", {f"tiny/{s}.txt": TINY[s].encode() for s in SPLITS})
    (www / "not-an-archive.zip").write_text("<html>a login page</html>\n")
    tgz = (www / "ptb.tgz").read_bytes()
    (www / "ptb-truncated.tgz").write_bytes(tgz[: len(tgz) // 2])

    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", wt2, ptb
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def dead_url():
    """A URL on a local port that nobody listens on: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/wt2.zip"


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("LSTMLM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def add_tiny(monkeypatch, url, tokens):
    members = {s: f"tiny/{s}.txt" for s in SPLITS}
    monkeypatch.setitem(datasets.DATASETS, "tiny", Dataset(url, members, None, tokens))


def test_wikitext2_download_then_resolve_uses_cache(server, tmp_path, monkeypatch, dead_url):
    base, wt2, _ = server
    root = tmp_path / "data"
    directory = download_dataset("wikitext-2", root=root, url=f"{base}/wt2.zip")
    assert directory == root / "wikitext-2"
    assert sorted(p.name for p in root.iterdir()) == ["wikitext-2"]  # no temp leftovers
    assert sorted(p.name for p in directory.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    for s in SPLITS:
        assert (directory / f"{s}.txt").read_bytes() == wt2[s]

    # Already there: resolved without asking any server (this one is dead).
    entry = dataclasses.replace(datasets.DATASETS["wikitext-2"], url=dead_url)
    monkeypatch.setitem(datasets.DATASETS, "wikitext-2", entry)
    QuietHandler.requests.clear()
    assert resolve_data("wikitext-2") == directory
    assert download_dataset("wikitext-2", root=root, url=dead_url) == directory
    assert QuietHandler.requests == []


@pytest.mark.parametrize("archive", ["ptb.tgz", "ptb-noprefix.tgz"])
def test_ptb_tgz(server, tmp_path, archive):
    base, _, ptb = server
    root = tmp_path / "data"
    directory = download_dataset("ptb", root=root, url=f"{base}/{archive}")
    for s in SPLITS:
        assert (directory / f"{s}.txt").read_bytes() == ptb[s]
    assert sorted(p.name for p in root.iterdir()) == ["ptb"]
    assert not (tmp_path / "escape.txt").exists()


def test_corrupted_split_fails_checksum_and_leaves_nothing(server, tmp_path):
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"train split failed its sha256 checksum") as e:
        download_dataset("wikitext-2", root=root, url=f"{server[0]}/wt2-corrupt.zip")
    assert datasets.DATASETS["wikitext-2"].sha256["train"] in str(e.value)  # expected value
    assert list(root.iterdir()) == []


def test_unreachable_host(tmp_path, dead_url):
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as e:
        download_dataset("wikitext-2", root=root, url=dead_url)
    message = str(e.value)
    assert "\n" not in message
    assert "could not download wikitext-2" in message and dead_url in message
    assert "--data /path/to/dir" in message
    assert not (root / "wikitext-2").exists()
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("name, path, message", [
    ("wikitext-2", "wt2-no-test.zip", r"no wikitext-2/wiki\.test\.tokens \(the test split\)"),
    ("wikitext-2", "nope.zip", r"HTTP 404.*--data"),
    ("wikitext-2", "not-an-archive.zip", r"neither a zip nor a tar archive"),
    ("ptb", "ptb-truncated.tgz", r"the archive is damaged"),
])
def test_bad_downloads_leave_nothing(server, tmp_path, name, path, message):
    """A missing member, an HTTP error, a non-archive or a truncated archive: one line, and
    nothing left in the data directory."""
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match=message) as e:
        download_dataset(name, root=root, url=f"{server[0]}/{path}")
    assert "\n" not in str(e.value)
    assert list(root.iterdir()) == []


def test_incomplete_existing_directory_is_not_overwritten(tmp_path, dead_url):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "train.txt").write_text("mine\n")
    with pytest.raises(DownloadError, match=r"exists but does not hold"):
        download_dataset("wikitext-2", root=tmp_path, url=dead_url)
    assert (tmp_path / "wikitext-2" / "train.txt").read_text() == "mine\n"


def test_a_named_dataset_in_the_wiki_tokens_layout_is_used_as_it_is(tmp_path, dead_url):
    folder = tmp_path / "data" / "wikitext-2"  # $LSTMLM_DATA/wikitext-2, as the zip unpacks
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text("a b\n")
    assert resolve_data("wikitext-2") == folder  # no download (the URL would fail)


def test_a_data_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, dead_url):
    (tmp_path / "a-file").write_text("kept\n")
    monkeypatch.setenv("LSTMLM_DATA", str(tmp_path / "a-file"))
    with pytest.raises(DownloadError, match="cannot store wikitext-2 in .*a-file") as e:
        resolve_data("wikitext-2")
    assert "\n" not in str(e.value) and (tmp_path / "a-file").read_text() == "kept\n"


def test_token_counts_verify_when_no_sha256(server, tmp_path, monkeypatch):
    url = f"{server[0]}/tiny.zip"
    add_tiny(monkeypatch, url, {"train": 7, "valid": 3, "test": 3})
    directory = resolve_data("tiny")  # downloads into $LSTMLM_DATA
    assert directory == tmp_path / "data" / "tiny"
    assert (directory / "test.txt").read_text() == TINY["test"]

    add_tiny(monkeypatch, url, {"train": 7, "valid": 4, "test": 3})
    root = tmp_path / "other"
    with pytest.raises(DownloadError, match=r"valid split has 3 tokens, expected 4"):
        download_dataset("tiny", root=root)
    assert list(root.iterdir()) == []


def test_interrupt_leaves_nothing(server, tmp_path, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "_verify", interrupt)
    root = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        download_dataset("wikitext-2", root=root, url=f"{server[0]}/wt2.zip")
    assert list(root.iterdir()) == []


def test_resolve_data_errors(tmp_path):
    assert resolve_data(str(tmp_path)) == tmp_path  # an existing directory is used as is
    plain = tmp_path / "book.txt"
    plain.write_text("a b\n")
    assert resolve_data(str(plain)) == plain  # and so is a file (data.split_file cuts it)
    with pytest.raises(LstmlmError, match="--data is empty"):
        resolve_data("")
    with pytest.raises(LstmlmError, match=r"--data nope: no such file or directory.*wikitext-2, "
                                          r"wikitext-103, ptb"):
        resolve_data("nope")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(LstmlmError, match=r"pipe: not a regular file or directory; pass a text"):
        resolve_data(str(tmp_path / "pipe"))
