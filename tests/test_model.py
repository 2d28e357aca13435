import pytest
import torch

from lstmlm.config import Config
from lstmlm.model import LSTMLM, count_parameters, detach


def small(**kw):
    return Config(**{"embedding_size": 8, "hidden_size": 12, "num_layers": 2, **kw})


def test_shapes_and_hidden_state():
    model = LSTMLM(small(), vocab_size=30)
    tokens = torch.randint(0, 30, (7, 3))
    logits, hidden = model(tokens, model.init_hidden(3))
    assert logits.shape == (7, 3, 30)
    assert len(hidden) == 2 and hidden[0][0].shape == (1, 3, 12)


def test_hidden_state_carries_information():
    model = LSTMLM(small(), vocab_size=30).eval()
    tokens = torch.randint(0, 30, (10, 2))
    full, _ = model(tokens, model.init_hidden(2))
    first, hidden = model(tokens[:6], model.init_hidden(2))
    second, _ = model(tokens[6:], detach(hidden))
    assert torch.allclose(torch.cat([first, second]), full, atol=1e-6)
    fresh, _ = model(tokens[6:], model.init_hidden(2))
    assert not torch.allclose(fresh, second)


def test_detach_cuts_the_graph():
    model = LSTMLM(small(), vocab_size=30)
    _, hidden = model(torch.randint(0, 30, (4, 2)), model.init_hidden(2))
    assert all(h.requires_grad for h, _ in hidden)
    assert not any(h.requires_grad or c.requires_grad for h, c in detach(hidden))


def test_baseline_parameter_count():
    # embedding 33278x380 + LSTM 4*400*(380+400+2) + 4*400*(400+400+2) + decoder 400*33278+33278
    model = LSTMLM(Config(), vocab_size=33_278)
    assert count_parameters(model) == 28_524_518


def test_dropout_only_in_training():
    model = LSTMLM(small(dropout_output=0.5), vocab_size=30)
    tokens = torch.randint(0, 30, (5, 2))
    model.eval()
    a, _ = model(tokens, model.init_hidden(2))
    b, _ = model(tokens, model.init_hidden(2))
    assert torch.equal(a, b)
    model.train()
    c, _ = model(tokens, model.init_hidden(2))
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("variational", [False, True])
def test_each_dropout_is_applied_where_its_name_says(monkeypatch, variational):
    """Input dropout on the embeddings, hidden dropout between layers only, output dropout on
    the last layer's output: in that order, each with its own probability."""
    cfg = small(num_layers=3, dropout_input=0.1, dropout_hidden=0.2, dropout_output=0.3,
                variational_dropout=variational)
    model = LSTMLM(cfg, vocab_size=30)
    calls = []
    real = model.dropout
    monkeypatch.setattr(model, "dropout", lambda x, p: calls.append((x.size(-1), p)) or real(x, p))
    model.features(torch.randint(0, 30, (4, 2)), model.init_hidden(2))
    assert calls == [(8, 0.1), (12, 0.2), (12, 0.2), (12, 0.3)]


def test_embedding_dropout_drops_a_word_at_every_position():
    model = LSTMLM(small(dropout_embedding=0.5), vocab_size=30).train()
    tokens = torch.randint(0, 30, (40, 4))  # each word about five times
    torch.manual_seed(0)
    embedded, _ = model.embed(tokens)
    weight, kept = model.embedding.weight, set()
    for word in tokens.unique().tolist():
        rows = embedded[tokens == word]
        if not (rows == 0).all():
            torch.testing.assert_close(rows, (weight[word] / 0.5).expand_as(rows))
            kept.add(word)
    assert 0 < len(kept) < len(tokens.unique())
    model.eval()
    assert torch.equal(model.embed(tokens)[0], weight[tokens])


def test_initial_weights_follow_awd_lstm():
    """Embedding (and an untied decoder) uniform in [-0.1, 0.1], decoder bias 0."""
    model = LSTMLM(small(), vocab_size=3000)
    for weight in (model.embedding.weight, model.decoder.weight):
        assert weight.abs().max() <= 0.1 and weight.abs().max() > 0.09
        assert abs(weight.mean().item()) < 0.01
    assert torch.count_nonzero(model.decoder.bias) == 0


def test_ar_on_the_dropped_output_tar_on_the_raw_output():
    cfg = awd(dropout_output=0.5, ar_alpha=2.0, tar_beta=3.0)
    model = LSTMLM(cfg, vocab_size=30).train()
    tokens, targets = torch.randint(0, 30, (6, 2)), torch.randint(0, 30, (12,))
    torch.manual_seed(1)
    dropped, raw, _ = model.features(tokens, model.init_hidden(2))
    torch.manual_seed(1)
    _, penalty, _ = model.loss(tokens, targets, model.init_hidden(2))
    expected = 2.0 * dropped.pow(2).mean() + 3.0 * (raw[1:] - raw[:-1]).pow(2).mean()
    assert not torch.equal(dropped, raw)
    torch.testing.assert_close(penalty, expected)


def test_loss_is_mean_cross_entropy():
    model = LSTMLM(small(), vocab_size=30).eval()
    tokens, targets = torch.randint(0, 30, (5, 2)), torch.randint(0, 30, (10,))
    loss, penalty, _ = model.loss(tokens, targets, model.init_hidden(2))
    assert penalty.item() == 0
    logits, _ = model(tokens, model.init_hidden(2))
    log_probs = torch.log_softmax(logits.view(-1, 30), -1)
    assert torch.allclose(loss, -log_probs[torch.arange(10), targets].mean())


def awd(**kw):
    return small(**{"dropout_input": 0.0, "dropout_hidden": 0.0, "dropout_output": 0.0, **kw})


def test_weight_drop_keeps_first_step_and_changes_later_steps():
    import warnings

    model = LSTMLM(awd(weight_drop=0.5, num_layers=1), vocab_size=30).train()
    tokens = torch.randint(0, 30, (6, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, _ = model(tokens, model.init_hidden(2))
        b, _ = model(tokens, model.init_hidden(2))
    # From a zero state, step 0 never touches weight_hh: same output under any mask.
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1:], b[1:])
    model.eval()
    c, _ = model(tokens, model.init_hidden(2))
    d, _ = model(tokens, model.init_hidden(2))
    assert torch.equal(c, d)


def test_weight_drop_trains_the_raw_recurrent_weights():
    model = LSTMLM(awd(weight_drop=0.5), vocab_size=30).train()
    loss, _, _ = model.loss(torch.randint(0, 30, (6, 2)), torch.randint(0, 30, (12,)),
                            model.init_hidden(2))
    loss.backward()
    for layer in model.layers:
        grad = layer.weight_hh_l0.grad
        assert grad is not None and grad.abs().sum() > 0
    assert [name for name, _ in model.named_parameters()] == [
        name for name, _ in LSTMLM(awd(), vocab_size=30).named_parameters()]


def test_weight_tying_shares_the_matrix_and_drops_parameters():
    untied = LSTMLM(awd(last_hidden_size=8), vocab_size=30)
    tied = LSTMLM(awd(last_hidden_size=8, tie_weights=True), vocab_size=30)
    assert tied.decoder.weight is tied.embedding.weight
    assert count_parameters(untied) - count_parameters(tied) == 30 * 8
    assert tied.layers[-1].hidden_size == 8


def test_awd_lstm_parameter_count():
    from lstmlm.config import load_preset
    # The reference AWD-LSTM implementation's count at its WikiText-2 size.
    assert count_parameters(LSTMLM(load_preset("awd-lstm"), vocab_size=33_278)) == 33_556_078


def test_every_regularizer_is_off_in_eval():
    cfg = small(variational_dropout=True, dropout_embedding=0.3, weight_drop=0.5, ar_alpha=1.0,
                tar_beta=1.0, dropout_input=0.5, dropout_hidden=0.3, dropout_output=0.4)
    model = LSTMLM(cfg, vocab_size=30)
    tokens = torch.randint(0, 30, (6, 2))
    a, _ = model.eval()(tokens, model.init_hidden(2))
    b, _ = model(tokens, model.init_hidden(2))
    c, _ = model.train()(tokens, model.init_hidden(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_ar_tar_penalty_only_when_training():
    model = LSTMLM(awd(ar_alpha=2.0, tar_beta=1.0), vocab_size=30)
    args = (torch.randint(0, 30, (6, 2)), torch.randint(0, 30, (12,)))
    _, penalty, _ = model.train().loss(*args, model.init_hidden(2))
    assert penalty.item() > 0
    _, penalty, _ = model.eval().loss(*args, model.init_hidden(2))
    assert penalty.item() == 0


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_target_log_probs_are_the_log_softmax_of_the_outputs(softmax):
    """Per-token scores (the cache pointer's) agree with the model's own outputs, for both
    decoders: log_softmax of the logits (the adaptive softmax's are log-probabilities)."""
    torch.manual_seed(0)
    model = LSTMLM(small(softmax=softmax, adaptive_cutoffs="10,20", tie_weights=False),
                   vocab_size=30).eval()
    tokens, targets = torch.randint(0, 30, (7, 3)), torch.randint(0, 30, (7, 3))
    with torch.no_grad():
        logits, _ = model(tokens, model.init_hidden(3))
        x, _, _ = model.features(tokens, model.init_hidden(3))
    expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = model.target_log_probs(x, targets)
    assert got.shape == targets.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_on_a_cpu_without_bf16_lstm_runs_the_lstm_in_fp32(monkeypatch):
    monkeypatch.setattr("lstmlm.model.CPU_BF16_LSTM", False)
    torch.manual_seed(0)
    model = LSTMLM(small(weight_drop=0.3), vocab_size=20)
    tokens = torch.randint(20, (5, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model.run_layer(0, model.embedding(tokens), model.init_hidden(3)[0])
        loss = model.loss(tokens, tokens.flatten(), model.init_hidden(3))[0]
    assert out.dtype == torch.float32
    with torch.no_grad():  # the same numbers as the layer without autocast
        model.eval()
        expected, _ = model.run_layer(0, model.embedding(tokens), model.init_hidden(3)[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = model.run_layer(0, model.embedding(tokens), model.init_hidden(3)[0])
    assert torch.equal(got, expected)
    loss.backward()
    assert torch.isfinite(loss) and model.layers[0].weight_hh_l0.grad.dtype == torch.float32
