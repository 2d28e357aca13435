"""Perplexity of a split: the mean cross-entropy of the model's logits, state carried over."""

import io
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from lstmlm.config import Config
from lstmlm.data import batchify
from lstmlm.evaluate import evaluate, perplexity, window_starts
from lstmlm.model import LSTMLM
from tests.helpers import Terminal, draw_every_update


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_mean_cross_entropy_of_the_logits(softmax):
    torch.manual_seed(0)
    cfg = Config(embedding_size=8, hidden_size=12, num_layers=2, dropout_input=0.5,
                 softmax=softmax, adaptive_cutoffs="10,30")
    model = LSTMLM(cfg, vocab_size=50)
    data = batchify(torch.randint(0, 50, (203,)), 3)  # 67 steps: windows of 10, the last of 6
    loss, tokens = evaluate(model, data, bptt=10)
    with torch.no_grad():  # the whole split in one window: same state, same logits
        logits, _ = model(data[:-1], model.init_hidden(3))
        expected = F.cross_entropy(logits.view(-1, 50), data[1:].reshape(-1))
    assert tokens == 66 * 3
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert not model.training


def test_windows_scored_together_give_the_same_loss():
    """The decoder runs on several windows at once (up to a chunk of the fused loss): 8 x 30
    rows a window, 4 windows to a chunk of 1,024 rows, 17 windows, the last one short."""
    torch.manual_seed(0)
    model = LSTMLM(Config(embedding_size=8, hidden_size=12, num_layers=2), vocab_size=50)
    data = batchify(torch.randint(0, 50, (8 * 500,)), 8)
    loss, tokens = evaluate(model, data, bptt=30)
    with torch.no_grad():
        logits, _ = model(data[:-1], model.init_hidden(8))
        expected = F.cross_entropy(logits.view(-1, 50), data[1:].reshape(-1))
    assert tokens == 499 * 8
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_perplexity_saturates():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50)) == pytest.approx(50)
    assert perplexity(1e6) == math.inf


def test_a_progress_bar_only_with_a_label_and_on_a_terminal(monkeypatch):
    draw_every_update(monkeypatch)
    data = torch.zeros(23, 2, dtype=torch.long)  # 22 rows of 2 streams to predict
    for label, stderr, drawn in (("test", Terminal(), True), ("", Terminal(), False),
                                 ("test", io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stderr)
        assert list(window_starts(data, 5, label)) == [0, 5, 10, 15, 20]
        assert ("test:" in stderr.getvalue()) == drawn
        assert ("40.0/44.0" in stderr.getvalue() and "44.0/44.0" in stderr.getvalue()) == drawn
