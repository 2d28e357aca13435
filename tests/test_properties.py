"""Property tests (hypothesis): the corpus reader, the vocabulary and the config parser take
anything and either work or raise their one error type."""

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lstmlm.config import FIELDS, Config, ConfigError, coerce, parse_assignment
from lstmlm.data import EOS, UNK, CorpusError, Vocab, read_lines

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
FILE_SETTINGS = settings(SETTINGS, max_examples=50)  # each example writes and fsyncs a file


@pytest.fixture(scope="module")
def scratch() -> Path:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# ---- the corpus reader ----------------------------------------------------------------------

# Bytes that are mostly text, with the characters that matter here: line ends of every kind,
# Unicode whitespace, control characters, NUL, invalid UTF-8.
TEXTISH = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(list("ab <>\t\n\r\x00\x01\x0b\x0c\x1c\x1f\x7f\x85")
                             + ["\u2028", "\u00e9", "\ufeff", "<eos>", "<unk>", "\r\n"]),
             max_size=40).map(lambda pieces: "".join(pieces).encode("utf-8")),
    st.text(max_size=60).map(lambda t: t.encode("utf-8")),
)


@SETTINGS
@given(raw=TEXTISH)
@example(raw=b"a\r\nb\rc\n\n")
@example(raw=b"\xff\xfe")
@example(raw=b" \n\t")
@example(raw=b"\xef\xbb\xbfthe cat\n")  # a byte-order mark
def test_read_lines_gives_words_or_a_corpus_error(scratch, raw):
    path = scratch / "corpus.txt"
    path.write_bytes(raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    try:
        lines = list(read_lines(path))
    except CorpusError as e:
        assert "\n" not in str(e)
        assert b"\x00" in raw or text is None or not text.split()
        return
    assert b"\x00" not in raw and text is not None
    assert all(type(w) is str and w and not any(c.isspace() for c in w)
               for words in lines for w in words)
    # The reference reading: a UTF-8 text file (a byte-order mark is not part of the text),
    # line by line, each line split on whitespace.
    with open(path, encoding="utf-8-sig") as f:
        assert lines == [line.split() for line in f]


# ---- the vocabulary -------------------------------------------------------------------------

LINES = st.lists(st.text(max_size=30).map(str.split), min_size=1, max_size=8)


@FILE_SETTINGS
@given(lines=LINES)
@example(lines=[["<eos>", "<unk>", "a\x01b", "\x7f"]])
def test_vocab_save_load_round_trip(scratch, lines):
    vocab = Vocab.from_lines(lines)
    vocab.save(scratch / "vocab.txt")
    again = Vocab.load(scratch / "vocab.txt")
    assert again.words == vocab.words
    assert (again.eos_id, again.unk_id) == (vocab.eos_id, vocab.unk_id)


@SETTINGS
@given(lines=LINES, other=LINES)
def test_encode_decode_round_trip(lines, other):
    vocab = Vocab.from_lines(lines)
    ids, unknown = vocab.encode(lines)
    assert unknown == 0
    assert vocab.decode(ids.tolist()) == [w for words in lines for w in words + [EOS]]
    # Words training never saw come back as <unk>, and are counted.
    ids, unknown = vocab.encode(other)
    expected = [w if w in vocab.index else UNK for words in other for w in words + [EOS]]
    assert vocab.decode(ids.tolist()) == expected
    assert unknown == sum(w not in vocab.index for words in other for w in words)


# ---- the config parser --------------------------------------------------------------------

KEYS = st.one_of(st.sampled_from(sorted(FIELDS)), st.text(max_size=20))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                       children, max_size=3),
    max_leaves=5)


def plausible(name: str):
    """Values of the field's own type, often valid ones (boundaries included), sometimes
    anything JSON holds."""
    kind = type(FIELDS[name].default)
    own = {bool: st.booleans(), int: st.integers(-2, 100),
           float: st.sampled_from([0.0, 0.3, 0.5, 0.99, 1.0, 4.0, 30.0, -1.0, math.inf,
                                   math.nan]) | st.floats(),
           str: st.sampled_from(["sgd", "adam", "adamw", "cpu", "auto", "data", ""])}[kind]
    return st.one_of(st.just(FIELDS[name].default), own, own, JSON)


# A few fields set to plausible values, or anything at all.
CONFIG_DICTS = st.one_of(
    st.lists(st.sampled_from(sorted(FIELDS)).flatmap(lambda k: st.tuples(st.just(k),
                                                                         plausible(k))),
             max_size=5).map(dict),
    st.dictionaries(KEYS, JSON, max_size=4),
)


@SETTINGS
@given(values=CONFIG_DICTS)
@example(values={"lr": float("nan")})
@example(values={"max_minutes": float("inf")})
@example(values={"tie_weights": True, "embedding_size": 8, "hidden_size": 8})
@example(values={"nan_lr_factor": 1})
def test_config_from_dict_gives_a_valid_config_or_a_config_error(values):
    try:
        cfg = Config.from_dict(values)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    cfg.validate()
    for key, value in values.items():
        assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(FIELDS[key].default)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # as config.json


ASSIGNMENTS = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(sorted(FIELDS)),
              st.one_of(st.text(max_size=12), st.integers().map(str), st.floats().map(str),
                        st.sampled_from(["true", "off", "1.5", "1e3", " 7 ", "nan", "-inf"]))),
)


@SETTINGS
@given(text=ASSIGNMENTS)
@example(text="hidden-size=650")
@example(text="batch_size=" + "9" * 5000)
def test_parse_assignment_gives_a_typed_value_or_a_config_error(text):
    try:
        key, value = parse_assignment(text)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert key in FIELDS and type(value) is type(FIELDS[key].default)
    assert coerce(key, value) is value  # what the CLI parsed, the config accepts as typed
