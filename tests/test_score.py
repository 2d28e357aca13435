"""Scoring lines (`LanguageModel.score`, `lstmlm score`) and the API's batched prompts."""

import copy
import io
import json
import math
import sys

import pytest
import torch

from tests.helpers import Terminal, draw_every_update, run
from lstmlm.config import Config
from lstmlm.data import EOS
from lstmlm.errors import LstmlmError
from lstmlm.model import LSTMLM

LINES = ["the cat sat on the mat", "a dog ate my bone", "", "some birds sang in trees"]


def logprob_by_hand(lm, lines: list[str]) -> float:
    """Sum of log p of every token (an <eos> after each line), one token at a time, from a
    fresh state after <eos>."""
    words = [w for line in lines for w in line.split() + [EOS]]
    hidden, previous, total = lm.model.init_hidden(1), lm.vocab.eos_id, 0.0
    with torch.no_grad():
        for word in words:
            target = lm.vocab.index.get(word, lm.vocab.unk_id)
            logits, hidden = lm.model(torch.tensor([[previous]]), hidden)
            total += torch.log_softmax(logits[0, 0].double(), -1)[target].item()
            previous = target
    return total


def test_each_line_from_a_fresh_state(lm):
    results = lm.score(LINES)
    assert [r["text"] for r in results] == LINES
    assert [r["tokens"] for r in results] == [7, 6, 1, 6]
    for line, r in zip(LINES, results):
        assert set(r) == {"text", "logprob", "tokens", "ppl"}
        assert r["logprob"] == pytest.approx(logprob_by_hand(lm, [line]), rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(-r["logprob"] / r["tokens"]), rel=1e-12)
        assert r == lm.score([line])[0]  # independent of the other lines


def test_continue_state_reads_the_lines_as_one_text(lm):
    results = lm.score(LINES, continue_state=True)
    assert results[0] == lm.score(LINES[:1])[0]  # the first line starts fresh either way
    total = sum(r["logprob"] for r in results)
    assert total == pytest.approx(logprob_by_hand(lm, LINES), rel=1e-5)
    assert total == pytest.approx(lm.score(["\n".join(LINES)])[0]["logprob"], rel=1e-5)
    assert results[1]["logprob"] != pytest.approx(lm.score(LINES)[1]["logprob"])
    tokens = sum(r["tokens"] for r in results)
    assert lm.perplexity("\n".join(LINES)) == pytest.approx(math.exp(-total / tokens), rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*not in the vocabulary")  # unknown words on purpose
def test_a_text_longer_than_a_chunk(lm):
    """Texts are read 1,024 tokens at a time: the prediction of each chunk's first token comes
    from the previous chunk's last output."""
    words = ("the cat sat on the mat and a dog ate my bone " * 95).split()  # 1,140 + <eos>
    (r,) = lm.score([" ".join(words)])
    assert r["tokens"] == 1141
    assert r["logprob"] == pytest.approx(logprob_by_hand(lm, [" ".join(words)]), rel=1e-5)


def test_scores_under_the_adaptive_softmax(lm):
    """With the adaptive softmax the scores are its exact log-probabilities (head and tails)."""
    adaptive = copy.copy(lm)
    torch.manual_seed(0)
    cfg = Config(embedding_size=8, hidden_size=12, num_layers=2, softmax="adaptive",
                 adaptive_cutoffs="5,12", tie_weights=False)
    adaptive.model = LSTMLM(cfg, len(lm.vocab)).eval()
    for line, r in zip(LINES, adaptive.score(LINES)):
        assert r["logprob"] == pytest.approx(logprob_by_hand(adaptive, [line]), rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*not in the vocabulary")  # unknown words on purpose
def test_per_token(lm):
    (r,) = lm.score(["the cat ate quinoa"], per_token=True)
    assert [t["token"] for t in r["per_token"]] == ["the", "cat", "ate", "quinoa", EOS]
    assert all(t["logprob"] < 0 for t in r["per_token"])
    assert sum(t["logprob"] for t in r["per_token"]) == pytest.approx(r["logprob"], rel=1e-6)
    # An unknown word is scored as <unk>.
    assert r["logprob"] == pytest.approx(lm.score(["the cat ate <unk>"])[0]["logprob"])


@pytest.mark.filterwarnings("ignore:.*not in the vocabulary")  # unknown words on purpose
def test_perplexity_is_the_score_of_one_text(lm):
    for text in ["the cat sat", "a dog\nate", "", "the zebra\n"]:
        assert lm.perplexity(text) == lm.score([text])[0]["ppl"]


def test_unknown_words_are_scored_as_unk_with_a_warning(lm):
    with pytest.warns(UserWarning, match=r"^2 word\(s\) not in the vocabulary, scored as <unk>: "
                                         r"zebra, quinoa$"):
        results = lm.score(["the zebra sat", "on the quinoa"])
    assert [r["tokens"] for r in results] == [4, 4]


def test_score_wants_a_list(lm):
    with pytest.raises(LstmlmError, match="list of texts"):
        lm.score("the cat sat")
    assert lm.score([]) == []


# ---- generate with a list of prompts -----------------------------------------------------------

PROMPTS = ["the cat", "a dog ate my", "the", "some birds sang"]


def test_a_list_of_prompts_gives_one_answer_each(lm):
    greedy = lm.generate(PROMPTS, max_tokens=8, temperature=0)
    assert greedy == [lm.generate(p, max_tokens=8, temperature=0) for p in PROMPTS]
    sampled = lm.generate(PROMPTS, max_tokens=6, seed=3, num_samples=2)
    assert len(sampled) == 4 and all(len(s) == 2 and all(isinstance(t, str) for t in s)
                                     for s in sampled)
    assert lm.generate(PROMPTS, max_tokens=6, seed=3, num_samples=2) == sampled
    assert lm.generate(["the cat"], max_tokens=5, seed=1) == [lm.generate("the cat", max_tokens=5,
                                                                          seed=1)]


def test_prompts_are_sampled_as_one_batch(lm, monkeypatch):
    batches = []
    forward = type(lm.model).forward

    def spy(model, tokens, hidden):
        batches.append(tuple(tokens.shape))
        return forward(model, tokens, hidden)

    monkeypatch.setattr(type(lm.model), "forward", spy)
    lm.generate(PROMPTS, max_tokens=3, seed=0, num_samples=2)
    # One forward per prompt length (2, 4, 1, 3 words, each after an <eos>), then one batch
    # of 8 per step.
    assert sorted(batches[:4]) == [(2, 1), (3, 1), (4, 1), (5, 1)]
    assert set(batches[4:]) == {(1, 8)}


def test_a_list_of_prompts_refuses_mistakes(lm):
    with pytest.raises(LstmlmError, match="no prompts"):
        lm.generate([])


# ---- CLI --------------------------------------------------------------------------------------


def user_error(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("lstmlm: error: ")
    return err


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def same_scores(got: list[dict], expected: list[dict]) -> bool:
    return all(g == pytest.approx(e) for g, e in zip(got, expected)) and len(got) == len(expected)


def test_score_json(capsys, lm, tiny_run, text_file):
    code, out, err = run(capsys, "score", tiny_run, text_file, "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert same_scores(result["lines"], lm.score(LINES))
    assert result["continue_state"] is False
    assert result["total"]["tokens"] == 20
    assert result["total"]["logprob"] == pytest.approx(sum(r["logprob"] for r in lm.score(LINES)))
    code, out, _ = run(capsys, "score", tiny_run, text_file, "--json", "--continue-state")
    assert same_scores(json.loads(out)["lines"], lm.score(LINES, continue_state=True))


def test_score_shows_its_progress_only_when_asked_and_on_a_terminal(capsys, monkeypatch, lm,
                                                                     tiny_run, text_file):
    draw_every_update(monkeypatch)
    quiet = json.loads(run(capsys, "score", tiny_run, text_file, "--json")[1])
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code, out, _ = run(capsys, "score", tiny_run, text_file, "--json")
    assert code == 0 and json.loads(out) == quiet
    assert "score:" in terminal.getvalue() and "20.0/20.0" in terminal.getvalue()
    before = terminal.getvalue()
    assert same_scores(lm.score(LINES), quiet["lines"])  # the API draws none unless asked
    assert terminal.getvalue() == before
    assert same_scores(lm.score(LINES, progress="lines"), quiet["lines"])
    assert "lines:" in terminal.getvalue()


def test_score_text_and_per_token(capsys, tiny_run, text_file):
    code, out, err = run(capsys, "score", tiny_run, text_file, "--per-token")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["logprob", "tokens", "ppl", "text"]
    assert lines[1].endswith("the cat sat on the mat") and lines[2].split()[-1] == "the"
    assert lines[-1].startswith("total: logprob ") and "(natural log)" in lines[-1]
    assert len(lines) == 1 + 4 + 20 + 1  # header, lines, tokens, total


def test_score_reads_stdin(capsys, monkeypatch, tiny_run, text_file):
    stdin(monkeypatch, text_file.read_bytes())
    code, out, _ = run(capsys, "score", tiny_run, "--json")
    stdin(monkeypatch, text_file.read_bytes())
    assert json.loads(out) == json.loads(run(capsys, "score", tiny_run, "-", "--json")[1])
    assert json.loads(out) == json.loads(run(capsys, "score", tiny_run, text_file, "--json")[1])


def test_score_warns_about_unknown_words(capsys, monkeypatch, tiny_run):
    stdin(monkeypatch, b"the zebra sat on the quinoa\n")
    with pytest.warns(UserWarning, match=r"^2 word\(s\) not in the vocabulary, scored as <unk>: "
                                         r"zebra, quinoa$"):
        assert run(capsys, "score", tiny_run)[0] == 0


@pytest.mark.parametrize("data, message", [
    (b"", "stdin: no text to score (the input is empty)"),
    (b" \n\n\t\n", "stdin: no text to score"),
    (b"\xff\xfe hello\n", "stdin: not UTF-8 text"),
    (b"a b\x00c\n", "stdin: looks like a binary file"),
])
def test_score_refuses_bad_input(capsys, monkeypatch, tiny_run, data, message):
    stdin(monkeypatch, data)
    assert message in user_error(capsys, "score", tiny_run, "-")


def test_score_refuses_a_missing_file_or_run(capsys, tiny_run, tmp_path, text_file):
    assert "file not found" in user_error(capsys, "score", tiny_run, tmp_path / "nope.txt")
    assert "is a directory" in user_error(capsys, "score", tiny_run, tmp_path)
    assert "no such run directory" in user_error(capsys, "score", tmp_path / "nope", text_file)
