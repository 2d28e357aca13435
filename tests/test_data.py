import io
import os
import subprocess
import sys

import torch
import pytest

from lstmlm import data
from lstmlm.data import EOS, UNK, CorpusError, Vocab, batchify, get_batch, load_corpus, tokenize


def write_corpus(directory, train, valid, test, names=("train.txt", "valid.txt", "test.txt")):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in zip(names, (train, valid, test)):
        (directory / name).write_text(text, encoding="utf-8")
    return directory


@pytest.mark.parametrize("name, counts, vocab_size", [
    ("wikitext-2", (2_088_628, 217_646, 245_569), 33_278),
    ("ptb", (929_589, 73_760, 82_430), 10_000),
])
def test_real_corpus_counts(shared_data, name, counts, vocab_size, monkeypatch):
    directory = shared_data / name
    if not directory.is_dir():
        pytest.fail(f"{directory} missing")
    corpus = load_corpus(directory)
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == counts
    assert len(corpus.vocab) == vocab_size
    assert corpus.unknown == {"train": 0, "valid": 0, "test": 0}
    # The second load comes from the tensor cache and gives the same corpus.
    monkeypatch.setattr(data, "tokenize", lambda *args: pytest.fail("cache not used"))
    again = load_corpus(directory)
    assert torch.equal(again.train, corpus.train) and again.vocab.words == corpus.vocab.words


def test_eos_per_line_and_unknown_words(tmp_path):
    d = write_corpus(tmp_path, " a b \n\n b c\n", "a zebra\n", "yak yak a\n")
    corpus = tokenize(d)
    v = corpus.vocab
    assert v.decode(corpus.train.tolist()) == ["a", "b", EOS, EOS, "b", "c", EOS]
    assert v.decode(corpus.valid.tolist()) == ["a", UNK, EOS]
    assert corpus.unknown == {"train": 0, "valid": 1, "test": 2}
    assert "valid 1" in corpus.summary() and "test 2" in corpus.summary()
    # Ids sorted by training frequency.
    assert v.words[0] == EOS and v.words[1] == "b"


def test_a_literal_unk_is_a_known_word_and_lines_are_read_once(tmp_path):
    d = write_corpus(tmp_path, "a <unk> b\n", "<unk> zebra <unk>\n", "b\n")
    corpus = tokenize(d)
    assert corpus.vocab.decode(corpus.valid.tolist()) == [UNK, UNK, UNK, EOS]
    assert corpus.unknown == {"train": 0, "valid": 1, "test": 0}  # zebra only
    # Both take any iterable of lines, a generator included, and read it once.
    vocab = Vocab.from_lines(line.split() for line in ["x y x", ""])
    assert vocab.words == ["x", EOS, "y", UNK]  # x and <eos> twice, in first-seen order
    ids, unknown = vocab.encode(line.split() for line in ["y z", "x"])
    assert ids.dtype == torch.long and ids.tolist() == [2, 3, 1, 0, 1] and unknown == 1


def test_min_count_maps_rare_training_words_to_unk(tmp_path):
    d = write_corpus(tmp_path / "c", "a a b c c c\nd\n", "a b e\n", "c\n")
    corpus = tokenize(d, min_count=2)
    # b and d are seen once; their two occurrences are <unk>'s, which ranks it with a and <eos>.
    assert corpus.vocab.words == ["c", "a", EOS, UNK]
    assert corpus.vocab.decode(corpus.train.tolist()) == [
        "a", "a", UNK, "c", "c", "c", EOS, UNK, EOS]
    assert corpus.vocab.decode(corpus.valid.tolist()) == ["a", UNK, UNK, EOS]
    assert corpus.unknown == {"train": 2, "valid": 2, "test": 0}
    assert "outside the vocabulary mapped to <unk>: train 2, valid 2" in corpus.summary()
    # min_count 1 keeps every word, the classic setup; each setting is cached on its own.
    assert tokenize(d, min_count=1).vocab.words == \
        tokenize(d).vocab.words == ["c", "a", EOS, "b", "d", UNK]
    assert len(load_corpus(d, 2).vocab) == 4 and len(load_corpus(d).vocab) == 6
    assert load_corpus(d, 2).vocab.words == corpus.vocab.words  # from the cache
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2


def test_max_vocab_keeps_the_most_frequent_words(tmp_path):
    d = write_corpus(tmp_path / "c", "a a b c c c\nd\n", "a b e\n", "c\n")
    # Four words in all: c, a and <eos> keep their ranks; b and d become <unk>, which then
    # counts 2, as often as a, and ranks after it.
    corpus = tokenize(d, max_vocab=4)
    assert corpus.vocab.words == ["c", "a", EOS, UNK]
    assert corpus.unknown == {"train": 2, "valid": 2, "test": 0}
    # At 3, a goes too: <unk> then counts 4 (a, a, b, d), more than c, and comes first.
    assert tokenize(d, max_vocab=3).vocab.words == [UNK, "c", EOS]
    assert tokenize(d, max_vocab=6).vocab.words == tokenize(d).vocab.words  # no word left out
    # With min_count, the rare words go first, then the limit applies to what is left.
    assert tokenize(d, min_count=2, max_vocab=3).vocab.words == [UNK, "c", EOS]
    # Each limit is cached on its own; no limit keeps the key of a corpus without one.
    assert len(load_corpus(d, max_vocab=4).vocab) == 4 and len(load_corpus(d).vocab) == 6
    assert len(load_corpus(d, max_vocab=3).vocab) == 3
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 3


def test_one_text_file_is_cut_by_lines(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("".join(f"w{i}\n" for i in range(45)))
    assert data.split_file(book) == {"train": [f"w{i}" for i in range(41)],
                                     "valid": ["w41", "w42"], "test": ["w43", "w44"]}
    assert data.read_split(book, "test") == (f"{book} (test part)", ["w43", "w44"])
    corpus = load_corpus(book)
    assert corpus.vocab.decode(corpus.valid.tolist()) == [UNK, EOS, UNK, EOS]
    assert (corpus.train.numel(), corpus.test.numel()) == (82, 4)
    book.write_text("a\nb\nc\n")  # the fewest lines: one per split; a new cache entry
    assert [load_corpus(book).split(s).numel() for s in ("train", "valid", "test")] == [2, 2, 2]
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2
    book.write_text("a\n\n")
    with pytest.raises(CorpusError, match=r"book.txt: 2 line\(s\); one text file is cut"):
        load_corpus(book)
    book.write_text("w\n" * 250_000)  # a large corpus keeps its validation quick
    assert [len(part) for part in data.split_file(book).values()] == [240_000, 5_000, 5_000]


def test_wiki_token_file_names_and_crlf(tmp_path):
    d = write_corpus(tmp_path, "x y\r\nz\r\n", "x\n", "y\n",
                     names=("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"))
    corpus = tokenize(d)
    assert corpus.vocab.decode(corpus.train.tolist()) == ["x", "y", EOS, "z", EOS]


def test_a_byte_order_mark_is_not_part_of_the_first_word(tmp_path):
    bom = "\ufeff"
    d = write_corpus(tmp_path, bom + "the cat\n", bom + "the\n", "cat\n")
    corpus = tokenize(d)
    assert corpus.vocab.decode(corpus.train.tolist()) == ["the", "cat", EOS]
    assert corpus.unknown == {"train": 0, "valid": 0, "test": 0}


def test_an_empty_cache_variable_means_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LSTMLM_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_root() == tmp_path / "xdg" / "lstmlm"


def test_cache_is_keyed_by_content(tmp_path):
    d = write_corpus(tmp_path / "c", "a b\n", "a\n", "b\n")
    first = load_corpus(d)
    (d / "train.txt").write_text("a b c\n")
    second = load_corpus(d)
    assert second.train.numel() == first.train.numel() + 1
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2


def test_damaged_cache_is_rebuilt(tmp_path):
    d = write_corpus(tmp_path / "c", "a b\n", "a\n", "b\n")
    load_corpus(d)
    (cache_file,) = (tmp_path / "cache" / "tokenized").iterdir()
    cache_file.write_bytes(b"junk")
    assert load_corpus(d).train.numel() == 3


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path):
    """A full disk (here a file-size limit) costs the cache, not the run."""
    d = write_corpus(tmp_path / "c", "a b c d e f g h\n" * 300, "a\n", "b\n")
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); "
              "from lstmlm.data import load_corpus; print(load_corpus(sys.argv[1]).train.numel())")
    done = subprocess.run([sys.executable, "-c", script, str(d)], capture_output=True, text=True,
                          env={**os.environ, "LSTMLM_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2700"]
    assert list((tmp_path / "cache" / "tokenized").iterdir()) == []  # no partial file left


@pytest.mark.parametrize("content, message", [
    (b"", "contains no words"),
    (b"\n\n  \n", "contains no words"),
    (b"abc\x00\x01def", "binary"),
    (b"word " * 300_000 + b"\x00", "binary"),  # past the first megabyte
    (b"caf\xe9 au lait\n", "not UTF-8"),
])
def test_unusable_files(tmp_path, content, message):
    d = write_corpus(tmp_path, "a\n", "a\n", "a\n")
    (d / "valid.txt").write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        tokenize(d)


def test_missing_split_and_directory(tmp_path):
    d = write_corpus(tmp_path, "a\n", "a\n", "a\n")
    (d / "test.txt").unlink()
    with pytest.raises(CorpusError, match="missing the test split"):
        data.find_split_files(d)
    with pytest.raises(CorpusError, match="no such directory"):
        data.find_split_files(tmp_path / "nope")


def test_read_lines_refuses_a_bad_file_when_called_not_when_read(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"a\x00b\n")
    with pytest.raises(CorpusError, match="binary"):
        data.read_lines(tmp_path / "bin.txt")  # not iterated


def test_an_invalid_byte_is_located_in_the_file_as_it_is(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfabc \xff\n")
    with pytest.raises(CorpusError, match=r"invalid byte 0xff at offset 7\)"):
        data.read_text(tmp_path / "bom.txt")


class OneEndOfFileThenNothing(io.RawIOBase):
    """A terminal after one Ctrl-D: the text, one empty read, then a read that must not come."""

    def __init__(self, text: bytes):
        self.reads = [text, b""]

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self.reads:
            raise AssertionError("read again after the end of the input")
        chunk = self.reads.pop(0)
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_standard_input_ends_at_the_first_end_of_file(monkeypatch):
    stdin = io.TextIOWrapper(io.BufferedReader(OneEndOfFileThenNothing(b"the cat\n")))
    monkeypatch.setattr("sys.stdin", stdin)
    assert data.read_text("-") == "the cat\n"
    monkeypatch.setattr("sys.stdin", None)  # `lstmlm score RUN - <&-`
    with pytest.raises(CorpusError, match="stdin is closed"):
        data.read_text("-")


def test_an_endless_stream_of_nuls_is_refused_at_once():
    with pytest.raises(CorpusError, match="/dev/zero: looks like a binary file"):
        data.read_text("/dev/zero")


def test_a_split_that_is_not_a_regular_file(tmp_path):
    d = write_corpus(tmp_path, "a b\n", "a\n", "b\n")
    (d / "train.txt").unlink()
    (d / "train.txt").mkdir()
    with pytest.raises(CorpusError, match=r"train.txt: not a regular file \(a directory, pipe"):
        data.find_split_files(d)


def test_vocab_round_trip(tmp_path):
    v = Vocab.from_lines([["b", "a", "b", "ü", "x\x01x"]])
    v.save(tmp_path / "vocab.txt")
    assert Vocab.load(tmp_path / "vocab.txt").words == v.words


def test_batchify_and_get_batch():
    stream = torch.arange(103)
    batches = batchify(stream, 4)
    assert batches.shape == (25, 4)
    # Column j is the j-th contiguous quarter of the stream.
    assert batches[:, 1].tolist() == list(range(25, 50))
    inputs, targets = get_batch(batches, 0, 10)
    assert inputs.shape == (10, 4) and targets.shape == (40,)
    assert torch.equal(targets.view(10, 4), batches[1:11])  # targets = inputs shifted by one
    inputs, targets = get_batch(batches, 20, 10)  # the last window is shorter
    assert inputs.shape == (4, 4) and torch.equal(targets.view(4, 4), batches[21:25])


def test_batchify_too_little_data():
    with pytest.raises(CorpusError, match="too few"):
        batchify(torch.arange(5), 4)
