"""The Python API: `lstmlm.load(run_dir)`, `.generate`, `.perplexity`."""

import math
import random

import pytest
import torch

import lstmlm
from lstmlm.data import EOS
from lstmlm.errors import LstmlmError


@pytest.fixture(scope="module")
def sentences(tiny_corpus) -> list[str]:
    """The distinct lines of the training split."""
    return sorted(set((tiny_corpus / "train.txt").read_text(encoding="utf-8").splitlines()))


def test_load_returns_a_language_model(lm, tiny_run):
    assert isinstance(lm, lstmlm.LanguageModel)
    assert lm.run_dir == tiny_run
    assert lm.config.hidden_size == 16 and len(lm.vocab) == lm.model.vocab_size
    assert not lm.model.training  # eval mode: no dropout at inference


def test_load_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(LstmlmError, match="no such run directory"):
        lstmlm.load(tmp_path / "nope")
    with pytest.raises(LstmlmError, match="not an lstmlm run directory"):
        lstmlm.load(tmp_path)


def test_generate_returns_text_deterministic_by_seed(lm):
    text = lm.generate("the cat", max_tokens=5, seed=1)
    assert isinstance(text, str)
    assert len(text.split()) + text.count("\n") == 5
    assert lm.generate("the cat", max_tokens=5, seed=1) == text
    assert lstmlm.load(lm.run_dir).generate("the cat", max_tokens=5, seed=1) == text
    longer = {lm.generate("the cat", max_tokens=30, seed=seed) for seed in range(5)}
    assert len(longer) > 1


def test_generate_several_samples(lm):
    texts = lm.generate("the cat", max_tokens=5, seed=1, num_samples=3)
    assert isinstance(texts, list) and len(texts) == 3
    assert all(isinstance(t, str) for t in texts)
    assert lm.generate("the cat", max_tokens=5, seed=1, num_samples=3) == texts


def test_generate_refuses_bad_arguments(lm):
    with pytest.raises(LstmlmError, match="top-p"):
        lm.generate("the cat", top_p=0)


@pytest.mark.parametrize("call, message", [
    (lambda lm: lm.generate(5), "prompt must be a string or a list of strings, got int"),
    (lambda lm: lm.generate(["the", 1]), "a prompt must be a string, got int"),
    (lambda lm: lm.generate(b"the"), "prompt must be a string or a list of strings, got bytes"),
    (lambda lm: lm.generate("the", temperature="1"), "temperature must be a number"),
    (lambda lm: lm.generate("the", top_p="0.5"), "top-p must be a number"),
    (lambda lm: lm.score([5]), "a text must be a string, got int"),
    (lambda lm: lm.score(None), "score takes a list of texts, got NoneType"),
    (lambda lm: lm.perplexity(None), "a text must be a string, got NoneType"),
    (lambda lm: lm.score(["the"], continue_state="no"), "continue_state must be True or False"),
    (lambda lm: lm.score(["the"], per_token=[]), "per_token must be True or False"),
    (lambda lm: lm.generate("the", temperature=10**400), "temperature is too large"),
    (lambda lm: lstmlm.load(None), "run_dir must be a path, got NoneType"),
    (lambda lm: lstmlm.load(5), "run_dir must be a path, got int"),
])
def test_arguments_of_the_wrong_type_get_one_clear_error(lm, call, message):
    with pytest.raises(LstmlmError, match=message):
        call(lm)


def test_a_huge_integer_temperature_is_a_number_like_any_other(lm):
    assert lm.generate("the", max_tokens=3, temperature=2**70, seed=1) == \
        lm.generate("the", max_tokens=3, temperature=float(2**70), seed=1)


def test_score_takes_any_iterable_of_texts(lm):
    texts = ["the cat", "a dog"]
    assert lm.score(t for t in texts) == lm.score(texts)
    assert lm.score(tuple(texts)) == lm.score(texts)


def test_unknown_word_warnings_point_at_the_callers_line(lm):
    """So that a notebook shows the user's line, and `filterwarnings(module=...)` works."""
    for call in (lambda: lm.score(["zzqx the"]), lambda: lm.perplexity("zzqx the"),
                 lambda: lm.encode("zzqx the"), lambda: lm.generate("zzqx", max_tokens=1),
                 lambda: lm.generate(["zzqx", "the"], max_tokens=1)):
        with pytest.warns(UserWarning, match="not in the vocabulary") as caught:
            call()
        assert [w.filename for w in caught] == [__file__]


def test_loading_leaves_the_callers_random_numbers_alone(tiny_run):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    lstmlm.load(tiny_run)
    assert torch.equal(torch.rand(3), expected)


def test_load_expands_the_home_directory_and_takes_a_device(tiny_run, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_run.parent))
    lm = lstmlm.load(f"~/{tiny_run.name}", device="auto")
    assert lm.run_dir == tiny_run
    assert lm.model.embedding.weight.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LstmlmError, match="device must be cpu, cuda or auto, got 'gpu'"):
        lstmlm.load(tiny_run, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(LstmlmError, match="no CUDA GPU is available"):
            lstmlm.load(tiny_run, device="cuda")


@pytest.mark.filterwarnings("ignore:.*not in the vocabulary")  # unknown words on purpose
def test_perplexity_is_finite_and_above_one(lm, sentences):
    for text in ["\n".join(sentences), sentences[0], "the zebra ate quinoa", ""]:
        ppl = lm.perplexity(text)
        assert math.isfinite(ppl) and ppl > 1, text


def test_perplexity_prefers_the_training_word_order(lm, sentences):
    corpus_like = "\n".join(sentences * 2)
    words = corpus_like.split()
    rng = random.Random(0)
    shuffled = []
    for _ in range(3):
        rng.shuffle(words)
        shuffled.append("\n".join(" ".join(words[i:i + 5]) for i in range(0, len(words), 5)))
    reversed_lines = "\n".join(" ".join(s.split()[::-1]) for s in sentences * 2)
    good = lm.perplexity(corpus_like)
    for nonsense in shuffled + [reversed_lines]:
        # Same words, same number of lines: only the order differs.
        assert sorted(nonsense.split()) == sorted(words)
        assert good < lm.perplexity(nonsense) / 2


def perplexity_by_hand(lm, text: str) -> float:
    """exp of the mean cross-entropy, feeding one token at a time from a fresh state after
    `<eos>`; each line ends with `<eos>`."""
    words = [w for line in text.split("\n") for w in line.split() + [EOS]]
    ids = [lm.vocab.index.get(w, lm.vocab.unk_id) for w in words]
    model = lm.model
    hidden = model.init_hidden(1)
    previous, nll = lm.vocab.eos_id, 0.0
    with torch.no_grad():
        for target in ids:
            logits, hidden = model(torch.tensor([[previous]]), hidden)
            nll -= torch.log_softmax(logits[0, 0].double(), dim=-1)[target].item()
            previous = target
    return math.exp(nll / len(ids))


@pytest.mark.filterwarnings("ignore:.*not in the vocabulary")  # unknown words on purpose
@pytest.mark.parametrize("text", [
    "the cat sat on the mat",
    "a dog ate my bone\nsome birds sang in trees",
    "the cat ate quinoa",  # an unknown word is scored as <unk>
    "the",
])
def test_perplexity_is_exp_of_the_cross_entropy(lm, text):
    assert lm.perplexity(text) == pytest.approx(perplexity_by_hand(lm, text), rel=1e-5)


def test_perplexity_ends_each_line_with_eos(lm):
    # A trailing newline adds no line; an inner newline is an <eos> between the words.
    assert lm.perplexity("the cat sat\n") == pytest.approx(lm.perplexity("the cat sat"))
    assert lm.perplexity("a dog\nate") == pytest.approx(perplexity_by_hand(lm, "a dog\nate"),
                                                        rel=1e-5)
    assert lm.perplexity("a dog\nate") != pytest.approx(lm.perplexity("a dog ate"))


def test_perplexity_does_not_depend_on_what_was_scored_before(lm):
    first = lm.perplexity("the cat sat on the mat")
    lm.perplexity("his fish swam through ponds\nour cow")
    lm.generate("a dog", max_tokens=5, seed=0)
    assert lm.perplexity("the cat sat on the mat") == first
