"""The adaptive softmax: exact log-probabilities, the cheap loss equals the full one, tying, and
every consumer of the model's logits (evaluation, scoring, generation, cache, dynamic
evaluation, export, checkpoints) works with it."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lstmlm
from lstmlm import checkpoint as ckpt
from lstmlm.cache import cache_evaluate
from lstmlm.config import Config, ConfigError, parse_value
from lstmlm.data import batchify, load_corpus, read_lines
from lstmlm.dynamic import dynamic_evaluate
from lstmlm.evaluate import evaluate
from lstmlm.export import export_model
from lstmlm.model import LSTMLM, count_parameters
from lstmlm.softmax import AdaptiveSoftmax
from lstmlm.train import run_training

VOCAB = 30


def adaptive(**kw) -> Config:
    values = dict(embedding_size=8, hidden_size=8, num_layers=1, softmax="adaptive",
                  adaptive_cutoffs="5,15", dropout_input=0.0, dropout_hidden=0.0,
                  dropout_output=0.0)
    values.update(kw)
    return Config(**values)


def batch(time=6, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(VOCAB, (time, batch), generator=generator)
    targets = torch.randint(VOCAB, (time * batch,), generator=generator)
    return tokens, targets


SETTINGS = [dict(), dict(tie_weights=True), dict(tie_weights=True, adaptive_div_value=1.0),
            dict(adaptive_cutoffs="5,100,200")]  # the last has cutoffs past the vocabulary


@pytest.mark.parametrize("kw", SETTINGS)
def test_log_probabilities_are_normalised(kw):
    torch.manual_seed(0)
    model = LSTMLM(adaptive(**kw), VOCAB).eval()
    tokens, _ = batch()
    with torch.no_grad():
        scores, _ = model(tokens, model.init_hidden(3))
    assert scores.shape == (6, 3, VOCAB)
    assert torch.allclose(scores.logsumexp(-1), torch.zeros(6, 3), atol=1e-5)
    assert torch.allclose(torch.log_softmax(scores, -1), scores, atol=1e-5)


@pytest.mark.parametrize("softmax", ["adaptive", "full"])
def test_the_loss_stays_fp32_under_bf16_autocast(softmax):
    model = LSTMLM(adaptive(softmax=softmax), VOCAB)
    tokens, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = model.loss(tokens, targets, model.init_hidden(3))
        log_probs = model.target_log_probs(model.features(tokens, model.init_hidden(3))[0],
                                           targets.view(6, 3))
    assert loss.dtype == torch.float32 and log_probs.dtype == torch.float32


@pytest.mark.parametrize("kw", SETTINGS)
def test_cheap_loss_is_the_full_cross_entropy(kw):
    torch.manual_seed(0)
    model = LSTMLM(adaptive(**kw), VOCAB)
    tokens, targets = batch()
    loss, penalty, _ = model.loss(tokens, targets, model.init_hidden(3))
    scores, _ = model(tokens, model.init_hidden(3))
    assert loss.item() == pytest.approx(F.nll_loss(scores.view(-1, VOCAB), targets).item(),
                                        abs=1e-5)
    assert loss.item() == pytest.approx(
        F.cross_entropy(scores.view(-1, VOCAB), targets).item(), abs=1e-5)
    assert penalty.item() == 0.0
    # The same gradient as the full cross-entropy.
    loss.backward()
    cheap = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scores, _ = model(tokens, model.init_hidden(3))
    F.cross_entropy(scores.view(-1, VOCAB), targets).backward()
    for c, p in zip(cheap, model.parameters()):
        assert torch.allclose(c, p.grad, atol=1e-6)


def test_log_probabilities_match_the_two_level_formula_with_every_bias():
    """Grave et al.'s factorisation written out by hand, with nonzero biases (they start at 0):
    a head word's log p is the head's log_softmax; a tail word's, its cluster's head entry plus
    the log_softmax of the cluster's words over the projected features."""
    torch.manual_seed(0)
    softmax = AdaptiveSoftmax(8, VOCAB, [5, 15], div_value=2.0)
    with torch.no_grad():
        for p in softmax.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(4, 8)
    words = [softmax.words[str(k)] for k in range(3)]
    head = torch.log_softmax(torch.cat([x @ words[0].T + softmax.bias[:5],
                                        x @ softmax.clusters.T + softmax.cluster_bias], -1), -1)
    expected = [head[:, :5]]
    for k, (lo, hi) in enumerate([(5, 15), (15, VOCAB)], start=1):
        projected = x @ softmax.projections[k - 1].T
        tail = torch.log_softmax(projected @ words[k].T + softmax.bias[lo:hi], -1)
        expected.append(head[:, 5 + k - 1: 5 + k] + tail)
    torch.testing.assert_close(softmax(x), torch.cat(expected, -1))


def test_every_parameter_gets_a_gradient_even_with_empty_clusters():
    # DistributedDataParallel expects every parameter in the graph of every step.
    model = LSTMLM(adaptive(), VOCAB)
    tokens, _ = batch()
    model.loss(tokens, torch.zeros(18, dtype=torch.long), model.init_hidden(3))[0].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cutoffs_past_the_vocabulary_are_dropped():
    model = LSTMLM(adaptive(adaptive_cutoffs="5,100,200"), VOCAB)
    assert model.decoder.bounds == [0, 5, VOCAB]
    full = LSTMLM(adaptive(adaptive_cutoffs="30"), VOCAB)  # no tail left: a plain softmax
    assert full.decoder.bounds == [0, VOCAB]
    assert count_parameters(full) == count_parameters(LSTMLM(adaptive(softmax="full"), VOCAB))


def test_what_is_tied():
    # Head tied; tails (projected to 4 and 2) have their own matrices.
    head_only = LSTMLM(adaptive(tie_weights=True), VOCAB).decoder
    assert head_only.tied == [True, False, False] and list(head_only.words) == ["1", "2"]
    # div_value 1: the tails' projections keep the embedding size, so they are tied too.
    everything = LSTMLM(adaptive(tie_weights=True, adaptive_div_value=1.0), VOCAB)
    assert everything.decoder.tied == [True, True, True] and len(everything.decoder.words) == 0
    untied = LSTMLM(adaptive(adaptive_div_value=1.0), VOCAB)
    assert count_parameters(untied) - count_parameters(everything) == VOCAB * 8
    untied = LSTMLM(adaptive(), VOCAB)
    assert count_parameters(untied) - count_parameters(LSTMLM(adaptive(tie_weights=True),
                                                              VOCAB)) == 5 * 8
    assert [n for n, _ in everything.named_parameters()].count("embedding.weight") == 1
    assert not any("embedding_weight" in n for n, _ in everything.named_parameters())


@pytest.mark.parametrize("div, tied_rows", [(4.0, range(5)), (1.0, range(VOCAB))])
def test_gradient_reaches_the_tied_embedding_through_the_decoder(div, tied_rows):
    model = LSTMLM(adaptive(tie_weights=True, adaptive_div_value=div), VOCAB)
    tokens = torch.zeros(4, 2, dtype=torch.long)  # the input reads row 0 only
    targets = torch.tensor([1, 2, 7, 8, 20, 25, 3, 9])  # a target in every cluster
    model.loss(tokens, targets, model.init_hidden(2))[0].backward()
    grad = model.embedding.weight.grad
    reached = (grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert reached == sorted(set(tied_rows) | {0})


def test_checkpoint_round_trip_keeps_the_tie(tmp_path):
    torch.manual_seed(0)
    model = LSTMLM(adaptive(tie_weights=True, adaptive_div_value=1.0), VOCAB).eval()
    tensors = ckpt.model_tensors(model)
    assert "decoder.embedding_weight" not in tensors
    ckpt.write_tensors(tmp_path / "w.safetensors", tensors)
    torch.manual_seed(1)
    loaded = LSTMLM(adaptive(tie_weights=True, adaptive_div_value=1.0), VOCAB).eval()
    ckpt.load_weights(loaded, ckpt.read_tensors(tmp_path / "w.safetensors")[0], tmp_path)
    assert loaded.decoder.embedding_weight is loaded.embedding.weight
    tokens, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(tokens, model.init_hidden(3))[0],
                           loaded(tokens, loaded.init_hidden(3))[0])


@pytest.mark.parametrize("values, message", [
    ({"softmax": "sampled"}, "softmax must be full or adaptive"),
    ({"adaptive_cutoffs": "2000;10000"}, "adaptive_cutoffs must be comma-separated"),
    ({"adaptive_cutoffs": ""}, "adaptive_cutoffs must be comma-separated"),
    ({"adaptive_cutoffs": "10000,2000"}, "adaptive_cutoffs must be increasing"),
    ({"adaptive_cutoffs": "0,10"}, "adaptive_cutoffs must be increasing word ids >= 1"),
    ({"adaptive_div_value": 0.5}, "adaptive_div_value must be >= 1"),
    ({"adaptive_div_value": math.nan}, "adaptive_div_value must be a finite number"),
])
def test_impossible_settings(values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(values)


def test_command_line_value():
    assert parse_value("adaptive_cutoffs", "4, 12") == "4, 12"
    assert Config(adaptive_cutoffs="4, 12").cutoffs == [4, 12]


# ---- a trained run and everything that reads its logits ---------------------------------------

@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    """A tiny adaptive run: head tied to the embedding, two tails of their own."""
    root = tmp_path_factory.mktemp("adaptive_run")
    cfg = Config(data=str(tiny_corpus), embedding_size=16, hidden_size=16, num_layers=1,
                 batch_size=4, bptt=8, valid_batch_size=2, test_batch_size=2, epochs=1, lr=1.0,
                 softmax="adaptive", adaptive_cutoffs="4,12", adaptive_div_value=2.0,
                 tie_weights=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_CACHE", str(root / "cache"))
        results = run_training(cfg, out=root / "run", quiet=True)
        test = load_corpus(tiny_corpus).test
    return root / "run", results, test


@pytest.fixture(scope="module")
def alm(run):
    return lstmlm.load(run[0])


def test_trains_and_loads_the_best_weights(run, alm):
    _, results, test = run
    assert isinstance(alm.model.decoder, AdaptiveSoftmax)
    assert results["stop_reason"] == "epochs"
    assert results["test_ppl"] < 6  # 27 words; the sentences are nearly deterministic
    loss, _ = evaluate(alm.model, batchify(test, 2), 8)
    assert loss == pytest.approx(results["test_loss"], rel=1e-6)
    assert results["parameters"] == count_parameters(alm.model)


def test_evaluate_is_the_mean_adaptive_loss(run, alm):
    data = batchify(run[2][:201], 1)
    loss, tokens = evaluate(alm.model, data, 50)
    with torch.no_grad():
        cheap, _, _ = alm.model.loss(data[:-1], data[1:].flatten(), alm.model.init_hidden(1))
    assert tokens == 200 and loss == pytest.approx(cheap.item(), rel=1e-5)


def test_score_and_generate(alm):
    (result,) = alm.score(["the cat sat on the mat"], per_token=True)
    ids = [alm.vocab.index[w] for w in "the cat sat on the mat <eos>".split()]
    model = alm.model
    with torch.no_grad():
        loss, _, _ = model.loss(torch.tensor([[alm.vocab.eos_id] + ids[:-1]]).t(),
                                torch.tensor(ids), model.init_hidden(1))
    assert result["logprob"] == pytest.approx(-loss.item() * len(ids), rel=1e-5)
    assert all(t["logprob"] < 0 for t in result["per_token"])
    greedy = alm.generate("the cat sat on the", max_tokens=1, temperature=0)
    prompt = torch.tensor([[alm.vocab.index[w]] for w in "the cat sat on the".split()])
    with torch.no_grad():
        scores, _ = model(prompt, model.init_hidden(1))
    assert greedy == alm.vocab.words[scores[-1, 0].argmax().item()]
    samples = alm.generate("the", max_tokens=8, num_samples=3, seed=1, top_p=0.9)
    assert samples == alm.generate("the", max_tokens=8, num_samples=3, seed=1, top_p=0.9)


def test_cache_and_dynamic_evaluation(alm, tiny_corpus):
    words = [w for w in alm.vocab.words if w not in ("<eos>", "<unk>")]
    repeated = torch.tensor([alm.vocab.index[w] for w in words[::-1][:15] * 4])
    static, _ = evaluate(alm.model, batchify(repeated, 1), 5)
    plain, _ = cache_evaluate(alm.model, repeated, 5, window=100, lambd=0.0)
    assert plain == pytest.approx(static, rel=1e-5)
    cached, _ = cache_evaluate(alm.model, repeated, 5, window=100, theta=0.5, lambd=0.5)
    assert cached < static
    before = {k: v.clone() for k, v in alm.model.state_dict().items()}
    train = alm.vocab.encode(read_lines(tiny_corpus / "train.txt"))[0]
    dynamic, _ = dynamic_evaluate(alm.model, repeated, train, lr=1e-3, stat_batches=5)
    assert dynamic < static
    assert all(torch.equal(before[k], v) for k, v in alm.model.state_dict().items())


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export(alm, tmp_path, fmt):
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
    path = export_model(alm.model, fmt, tmp_path / "m")
    tokens = torch.randint(len(alm.vocab), (5, 3), generator=torch.Generator().manual_seed(0))
    hidden = alm.model.init_hidden(3)
    with torch.no_grad():
        want, _ = alm.model(tokens, hidden)
    states = [t for h, c in hidden for t in (h, c)]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            exported = torch.jit.load(str(path))
        with torch.no_grad():
            got = exported(tokens, *states)[0]
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"tokens": tokens.numpy(), "h0": states[0].numpy(), "c0": states[1].numpy()}
        got = torch.from_numpy(session.run(None, feed)[0])
    assert torch.allclose(got, want, atol=1e-5)
