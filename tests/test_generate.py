"""Sampling: logit filters, greedy decoding, seeds, batches of samples, prompts."""

import math

import pytest
import torch

from lstmlm.data import EOS, UNK
from lstmlm.errors import LstmlmError
from lstmlm.generate import check_sampling, detokenize, encode_prompt, filter_logits, sample

# Probabilities 0.5, 0.3, 0.15, 0.05; the second row holds them in the opposite order.
PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> list[set[int]]:
    """Indices of the finite logits of each row."""
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


# ---- filter_logits ----------------------------------------------------------------------------

def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 0.5, 2.0], [5.0, 0.0, 1.0, 3.0, 4.0]])
    assert kept(filter_logits(logits, top_k=1)) == [{1}, {0}]
    assert kept(filter_logits(logits, top_k=2)) == [{1, 2}, {0, 4}]
    assert kept(filter_logits(logits, top_k=3)) == [{1, 2, 4}, {0, 3, 4}]
    filtered = filter_logits(logits, top_k=2)
    finite = torch.isfinite(filtered)
    assert torch.equal(filtered[finite], logits[finite])  # kept logits are unchanged
    assert torch.all(filtered[~finite] == float("-inf"))


@pytest.mark.parametrize("top_k", [0, 5, 50])
def test_top_k_off_or_at_least_the_vocabulary_keeps_everything(top_k):
    logits = torch.tensor([[1.0, 4.0, 3.0, 0.5, 2.0]])
    assert torch.equal(filter_logits(logits, top_k=top_k), logits)


def test_filter_logits_leaves_its_input_alone():
    logits = LOGITS.clone()
    filter_logits(logits, top_k=1, top_p=0.5)
    assert torch.equal(logits, LOGITS)


@pytest.mark.parametrize("top_p, size", [
    (0.3, 1), (0.5, 1), (0.51, 2), (0.7, 2), (0.8, 2), (0.81, 3), (0.9, 3), (0.96, 4), (1.0, 4),
])
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p, size):
    # The most likely tokens come first in row 0 and last in row 1.
    assert kept(filter_logits(LOGITS, top_p=top_p)) == [set(range(size)), set(range(4 - size, 4))]


@pytest.mark.parametrize("top_p", [1e-50, 1e-9, 1e-3])  # 1e-50 is 0 in float32
def test_top_p_always_keeps_the_most_likely_token(top_p):
    assert kept(filter_logits(LOGITS, top_p=top_p)) == [{0}, {3}]


def test_top_p_is_unchanged_by_a_shift_of_the_logits():
    assert kept(filter_logits(LOGITS + 100.0, top_p=0.7)) == kept(filter_logits(LOGITS, top_p=0.7))


@pytest.mark.parametrize("top_k, top_p, size", [
    (3, 0.7, 2),   # top-p is the stricter
    (2, 0.95, 2),  # top-k is the stricter
    (1, 0.99, 1),
    (4, 0.7, 2),
])
def test_top_k_and_top_p_together_keep_what_both_allow(top_k, top_p, size):
    assert kept(filter_logits(LOGITS, top_k=top_k, top_p=top_p)) == [
        set(range(size)), set(range(4 - size, 4))]


# ---- sample -----------------------------------------------------------------------------------

def greedy_by_hand(model, prompt_ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        logits, hidden = model(torch.tensor(prompt_ids).unsqueeze(1), model.init_hidden(1))
        out = []
        for _ in range(steps):
            next_id = logits[-1, 0].argmax().item()
            out.append(next_id)
            logits, hidden = model(torch.tensor([[next_id]]), hidden)
    return out


def test_greedy_is_the_argmax_continuation(lm):
    prompt_ids, _ = encode_prompt(lm.vocab, "the cat")
    expected = greedy_by_hand(lm.model, prompt_ids, 12)
    steps = list(sample(lm.model, prompt_ids, 12, temperature=0))
    assert [s.item() for s in steps] == expected
    assert lm.generate("the cat", max_tokens=12, temperature=0) == detokenize(
        lm.vocab.decode(expected))


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-300])
def test_a_tiny_temperature_samples_the_greedy_continuation(lm, temperature):
    greedy = lm.generate("the cat", max_tokens=12, temperature=0)
    assert lm.generate("the cat", max_tokens=12, temperature=temperature, seed=1) == greedy


def test_a_prompt_is_read_as_score_reads_a_text(lm):
    # log p(next word | prompt) in generation equals what score gives that word after it.
    steps = sample(lm.model, encode_prompt(lm.vocab, "the cat")[0], 1, temperature=0)
    next_id = next(steps).item()
    with torch.no_grad():
        ids = torch.tensor(encode_prompt(lm.vocab, "the cat")[0]).unsqueeze(1)
        logits, _ = lm.model(ids, lm.model.init_hidden(1))
        probs = torch.log_softmax(logits[-1, 0], -1)
    word = lm.vocab.words[next_id]
    scored = lm.score(["the cat " + word], per_token=True)[0]["per_token"]
    assert scored[2]["token"] == word
    assert scored[2]["logprob"] == pytest.approx(probs[next_id].item(), abs=1e-5)


def test_greedy_ignores_the_seed(lm):
    texts = {lm.generate("a dog", max_tokens=10, temperature=0, seed=s) for s in range(3)}
    assert len(texts) == 1


def test_a_tiny_top_p_samples_the_greedy_continuation(lm):
    greedy = lm.generate("the", max_tokens=5, temperature=0)
    assert lm.generate("the", max_tokens=5, top_p=1e-50, seed=3) == greedy


def test_top_k_1_samples_the_greedy_continuation(lm):
    greedy = lm.generate("the cat", max_tokens=10, temperature=0)
    assert lm.generate("the cat", max_tokens=10, top_k=1, seed=5) == greedy
    assert lm.generate("the cat", max_tokens=10, top_p=1e-6, seed=5) == greedy


def test_same_seed_same_text(lm):
    first = lm.generate("the cat", max_tokens=30, seed=42)
    assert lm.generate("the cat", max_tokens=30, seed=42) == first
    assert lm.generate("the cat", max_tokens=30, seed=42, top_k=5, top_p=0.9) == \
        lm.generate("the cat", max_tokens=30, seed=42, top_k=5, top_p=0.9)


def test_different_seeds_give_different_text(lm):
    # Each new line starts one of five sentences at random: 30 tokens leave room for variety.
    texts = {lm.generate("the cat", max_tokens=30, seed=seed) for seed in range(5)}
    assert len(texts) > 1


def test_unseeded_sampling_leaves_the_global_rng_alone(lm):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    lm.generate("the cat", max_tokens=3)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("num_samples", [1, 3, 8])
def test_num_samples_are_sampled_as_one_batch(lm, num_samples):
    prompt_ids, _ = encode_prompt(lm.vocab, "the cat")
    steps = list(sample(lm.model, prompt_ids, 7, num_samples=num_samples, seed=0))
    assert len(steps) == 7
    assert all(s.shape == (num_samples,) and s.dtype == torch.long for s in steps)
    assert all(0 <= i < len(lm.vocab) for s in steps for i in s.tolist())


def test_generate_returns_one_text_per_sample(lm):
    texts = lm.generate("the cat", max_tokens=20, num_samples=4, seed=3)
    assert isinstance(texts, list) and len(texts) == 4
    assert all(isinstance(t, str) and t.split() for t in texts)
    assert len(set(texts)) > 1  # independent samples, not one repeated
    assert lm.generate("the cat", max_tokens=20, num_samples=4, seed=3) == texts


def test_samples_of_a_batch_match_greedy_when_greedy(lm):
    texts = lm.generate("a dog", max_tokens=8, temperature=0, num_samples=3)
    assert texts == [lm.generate("a dog", max_tokens=8, temperature=0)] * 3


# ---- prompts and text -------------------------------------------------------------------------

def test_prompts_of_mixed_lengths_each_get_their_own_continuations(lm):
    """Read in groups of equal length (order 0, 3, 1, 2 here), answered in the prompts' order,
    each prompt's samples together."""
    prompts = ["a dog", "the cat sat", "our", "his fish"]
    alone = [lm.generate(p, max_tokens=4, temperature=0) for p in prompts]
    assert len(set(alone)) == len(prompts)  # otherwise a mix-up could go unseen
    together = lm.generate(prompts, max_tokens=4, temperature=0, num_samples=2)
    assert together == [[text, text] for text in alone]


def test_sampling_turns_dropout_off(tiny_run):
    """A model still in training mode (a Trainer's, say) samples as the loaded one does."""
    from lstmlm.checkpoint import load_run

    cfg, vocab, model = load_run(tiny_run)
    model.cfg.dropout_output = 0.5
    prompt_ids, _ = encode_prompt(vocab, "the cat")
    expected = [s.tolist() for s in sample(model, prompt_ids, 8, temperature=0)]
    model.train()
    assert [s.tolist() for s in sample(model, prompt_ids, 8, temperature=0)] == expected


def test_prompt_spanning_lines_encodes_eos(lm):
    v = lm.vocab
    eos = v.eos_id  # first: the prompt starts a line, as score reads a text
    ids, unknown = encode_prompt(v, "the cat\nsat on")
    assert ids == [eos, v.index["the"], v.index["cat"], eos, v.index["sat"], v.index["on"]]
    assert unknown == []
    ids, _ = encode_prompt(v, "the cat\n")  # a final newline ends the line: the model saw <eos>
    assert ids == [eos, v.index["the"], v.index["cat"], eos]
    ids, _ = encode_prompt(v, "a dog\n\nthe")  # an empty line is one more <eos>
    assert ids == [eos, v.index["a"], v.index["dog"], eos, eos, v.index["the"]]


def test_unknown_prompt_words_become_unk(lm):
    ids, unknown = encode_prompt(lm.vocab, "the zebra ate quinoa")
    assert ids[2] == ids[4] == lm.vocab.unk_id
    assert unknown == ["zebra", "quinoa"]
    assert lm.vocab.words[lm.vocab.unk_id] == UNK


def test_generate_warns_about_unknown_prompt_words(lm):
    with pytest.warns(UserWarning, match=r"2 prompt word\(s\).*zebra, quinoa"):
        text = lm.generate("the zebra ate quinoa", max_tokens=5, seed=0)
    assert isinstance(text, str)


@pytest.mark.parametrize("prompt, lines", [("", 1), ("   ", 1), ("\n", 2), (" \n\t\n", 3)])
def test_a_prompt_without_words_starts_a_line(lm, prompt, lines):
    eos = lm.vocab.index["<eos>"]
    assert encode_prompt(lm.vocab, prompt) == ([eos] * lines, [])
    expected = detokenize(lm.vocab.decode(greedy_by_hand(lm.model, [eos] * lines, 6)))
    assert lm.generate(prompt, max_tokens=6, temperature=0) == expected
    if lines == 1:
        assert lm.generate(max_tokens=6, temperature=0) == expected


def test_detokenize_maps_eos_to_newlines():
    assert detokenize(["the", "cat", EOS, "a", "dog"]) == "the cat\na dog"
    assert detokenize(["the", EOS, EOS, "dog"]) == "the\n\ndog"
    assert detokenize(["mat", EOS]) == "mat\n"
    assert detokenize([]) == ""


def test_generated_text_is_words_of_the_vocabulary(lm):
    text = lm.generate("the cat", max_tokens=40, seed=7)
    words = text.split()
    assert words and all(w in lm.vocab.index for w in words)
    assert EOS not in text
    assert len(words) + text.count("\n") == 40  # each token is a word or a line break


# ---- argument checks --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max tokens"),
    ({"max_tokens": 10**9}, "max tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_k": -1}, "top-k"),
    ({"top_p": 0.0}, "top-p"),
    ({"top_p": 1.5}, "top-p"),
    ({"top_p": math.nan}, "top-p"),
    ({"num_samples": 0}, "number of samples"),
    ({"seed": 2**64}, "seed must be a 64-bit integer"),
    ({"max_tokens": 5.0}, "max tokens must be an integer, got 5.0"),
    ({"top_k": 2.0}, "top-k must be an integer"),
    ({"num_samples": True}, "number of samples must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": -2**63 - 1}, "seed must be a 64-bit integer"),
])
def test_bad_sampling_arguments_are_refused(lm, kwargs, match):
    args = {"max_tokens": 5, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_samples": 1,
            **kwargs}
    with pytest.raises(LstmlmError, match=match):
        check_sampling(**args)
    with pytest.raises(LstmlmError, match=match):
        lm.generate("the cat", **args)


def test_good_sampling_arguments_pass():
    check_sampling(1, 0.0, 0, 1.0, 1)
    check_sampling(100, 2.0, 10, 0.01, 1024)
