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


def test_loss_is_mean_cross_entropy():
    model = LSTMLM(small(), vocab_size=30).eval()
    tokens, targets = torch.randint(0, 30, (5, 2)), torch.randint(0, 30, (10,))
    loss, penalty, _ = model.loss(tokens, targets, model.init_hidden(2))
    assert penalty.item() == 0
    logits, _ = model(tokens, model.init_hidden(2))
    log_probs = torch.log_softmax(logits.view(-1, 30), -1)
    assert torch.allclose(loss, -log_probs[torch.arange(10), targets].mean())
