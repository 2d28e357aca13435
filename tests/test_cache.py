"""The continuous cache pointer: against a slow reference, limits, search, and the CLI."""

import json
import math

import pytest
import torch

from lstmlm.cache import cache_evaluate, cache_search, check_cache
from tests.helpers import run
from lstmlm.data import batchify, read_lines
from lstmlm.errors import LstmlmError
from lstmlm.evaluate import evaluate


@pytest.fixture(scope="module")
def test_ids(lm, tiny_corpus) -> torch.Tensor:
    """The first 90 tokens of the tiny test split."""
    return lm.vocab.encode(read_lines(tiny_corpus / "test.txt"))[0][:90]


def reference_loss(model, streams: list[list[int]], window: int, theta: float,
                   lambd: float) -> float:
    """The definition, one token at a time, every sum a Python loop, in float64."""
    nll, count = 0.0, 0
    for stream in streams:
        hidden, outputs, probs = model.init_hidden(1), [], []
        with torch.no_grad():
            for x in stream[:-1]:
                _, h, hidden = model.features(torch.tensor([[x]]), hidden)
                outputs.append(h[0, 0].double())
                probs.append(torch.softmax(model.decoder(h[0, 0]).double(), -1))
        for t in range(len(stream) - 1):
            target = stream[t + 1]
            p = probs[t][target].item()
            window_ids = range(max(0, t - window), t)
            if window_ids:  # an empty cache leaves the model alone
                weights = {i: math.exp(theta * torch.dot(outputs[t], outputs[i]).item())
                           for i in window_ids}
                hits = sum(w for i, w in weights.items() if stream[i + 1] == target)
                p = (1 - lambd) * p + lambd * hits / sum(weights.values())
            nll -= math.log(p)
            count += 1
    return nll / count


@pytest.mark.parametrize("batch, window, theta, lambd", [
    (1, 10, 0.662, 0.3), (1, 200, 1.5, 0.1279), (2, 6, 0.0, 0.5), (1, 10, 0.5, 0.9)])
def test_matches_the_slow_reference(lm, test_ids, batch, window, theta, lambd):
    data = batchify(test_ids, batch)
    loss, tokens = cache_evaluate(lm.model, data, 7, window, theta, lambd)
    streams = [data[:, b].tolist() for b in range(batch)]
    assert tokens == sum(len(s) - 1 for s in streams)
    expected = reference_loss(lm.model, streams, window, theta, lambd)
    assert math.exp(loss) == pytest.approx(math.exp(expected), rel=1e-5)


def test_a_window_longer_than_the_stream_holds_the_whole_stream(lm, test_ids):
    whole = cache_evaluate(lm.model, test_ids, 7, len(test_ids), 0.662, 0.3)
    assert cache_evaluate(lm.model, test_ids, 7, 2**70, 0.662, 0.3) == whole


def test_lambda_one_is_the_cache_alone(lm, test_ids):
    # A target the window never saw then has probability 0: an infinite loss, not an error.
    assert cache_evaluate(lm.model, test_ids, 8, 10, 0.662, 1.0)[0] == math.inf


def test_does_not_depend_on_the_bptt_length(lm, test_ids):
    losses = [cache_evaluate(lm.model, test_ids, bptt, 12, 0.662, 0.2)[0] for bptt in (1, 5, 89)]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-6)


@pytest.mark.parametrize("batch", [1, 2])
def test_lambda_zero_is_plain_evaluation(lm, test_ids, batch):
    data = batchify(test_ids, batch)
    plain, tokens = evaluate(lm.model, data, 8)
    assert cache_evaluate(lm.model, data, 8, 50, 0.662, 0.0) == (pytest.approx(plain, rel=1e-6),
                                                                  tokens)


def test_the_cache_lowers_perplexity_on_repeated_text(lm, repeated):
    plain, _ = evaluate(lm.model, batchify(repeated, 1), 8)
    cached, _ = cache_evaluate(lm.model, repeated, 8, 100, 1.0, 0.3)
    assert math.exp(cached) < math.exp(plain) / 3


def test_search_tries_the_grid_best_first(lm, repeated):
    grid = cache_search(lm.model, repeated, 8, 100, thetas=(0.0, 1.0), lambdas=(0.0, 0.1, 0.5))
    assert len(grid) == 6
    assert [r["loss"] for r in grid] == sorted(r["loss"] for r in grid)
    best = grid[0]
    assert best["lambda"] > 0
    loss, _ = cache_evaluate(lm.model, repeated, 8, 100, best["theta"], best["lambda"])
    assert loss == pytest.approx(best["loss"], rel=1e-9)


@pytest.mark.parametrize("window, theta, lambd, message", [
    (0, 0.662, 0.1, "window must be at least 1"),
    (10, -0.1, 0.1, "theta must be a number >= 0"),
    (10, math.nan, 0.1, "theta must be a number >= 0"),
    (10, 0.662, -0.1, r"lambda must be in \[0, 1\]"),
    (10, 0.662, 1.5, r"lambda must be in \[0, 1\]"),
])
def test_refuses_impossible_settings(window, theta, lambd, message):
    with pytest.raises(LstmlmError, match=message):
        check_cache(window, theta, lambd)


# ---- CLI --------------------------------------------------------------------------------------


def test_evaluate_with_the_cache(capsys, tiny_run, tiny_corpus):
    code, out, err = run(capsys, "evaluate", tiny_run, "--cache", "--cache-window", "50", "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert result["batch_size"] == 1  # the reference setting is the default
    assert result["cache"] == {"window": 50, "theta": 0.662, "lambda": 0.1279}
    assert result["tokens"] == sum(len(w) + 1 for w in read_lines(tiny_corpus / "test.txt")) - 1
    assert math.isfinite(result["ppl"]) and result["ppl"] > 1
    code, out, _ = run(capsys, "evaluate", tiny_run, "--cache", "--split", "valid")
    assert code == 0 and "cache window 3785 theta 0.662 lambda 0.1279" in out


def test_json_has_null_for_an_infinite_loss(capsys, tiny_run):
    # With lambda 1 the cache alone predicts: the first word (an empty cache) is impossible.
    code, out, _ = run(capsys, "evaluate", tiny_run, "--cache", "--cache-lambda", "1", "--json")
    assert code == 0
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert result["loss"] is None and result["ppl"] is None and result["tokens"] > 0


def test_cache_search_picks_a_pair_on_valid(capsys, tiny_run):
    code, out, err = run(capsys, "evaluate", tiny_run, "--cache-search", "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    best = result["cache_search"][0]
    assert len(result["cache_search"]) == 20
    assert result["cache"]["theta"] == best["theta"]
    assert result["cache"]["lambda"] == best["lambda"]
    code, out, _ = run(capsys, "evaluate", tiny_run, "--cache-search")
    assert out.startswith("cache search on valid: best theta ")
    assert out.splitlines()[1].startswith("test: loss ")


@pytest.mark.parametrize("args, message", [
    (["--cache", "--cache-window", "0"], "cache window must be at least 1"),
    (["--cache", "--cache-theta", "-1"], "cache theta must be a number >= 0"),
    (["--cache", "--cache-lambda", "1.5"], "cache lambda must be in [0, 1]"),
    (["--cache-theta", "0.5"], "--cache-theta only applies with --cache"),
    (["--cache-theta", "0"], "--cache-theta only applies with --cache"),
    (["--dynamic-decay", "0"], "--dynamic-decay only applies with --dynamic"),
    (["--cache", "--dynamic"], "cannot be combined"),
    (["--cache-search", "--cache-lambda", "0.1"], "--cache-search chooses theta and lambda"),
    (["--cache", "--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_cache_mistakes(capsys, tiny_run, args, message):
    code, out, err = run(capsys, "evaluate", tiny_run, *args)
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("lstmlm: error: ") and message in err
