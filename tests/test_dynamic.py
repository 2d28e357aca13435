"""Dynamic evaluation: it adapts, it scores before it learns, and it never changes the model."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import run, snapshot
from lstmlm.data import batchify, read_lines
from lstmlm.dynamic import check_dynamic, dynamic_evaluate, gradient_rms
from lstmlm.errors import LstmlmError
from lstmlm.evaluate import evaluate


@pytest.fixture(scope="module")
def train_ids(lm, tiny_corpus) -> torch.Tensor:
    return lm.vocab.encode(read_lines(tiny_corpus / "train.txt"))[0]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lowers_perplexity_on_repeated_text(lm, repeated, train_ids):
    static, tokens = evaluate(lm.model, batchify(repeated, 1), 5)
    dynamic, dynamic_tokens = dynamic_evaluate(lm.model, repeated, train_ids, lr=1e-2,
                                               stat_batches=10)
    assert dynamic_tokens == tokens == repeated.numel() - 1
    assert math.exp(dynamic) < math.exp(static) / 3


def test_leaves_the_model_as_it_was(lm, repeated, train_ids):
    before = weights(lm.model)
    dynamic_evaluate(lm.model, repeated, train_ids, lr=1e-2, stat_batches=10)
    after = weights(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not lm.model.training
    assert all(p.grad is None for p in lm.model.parameters())


def test_a_negligible_step_is_static_evaluation(lm, repeated, train_ids):
    # Each segment is scored before the step that learns from it.
    for batch in (1, 2):
        data = batchify(repeated, batch)
        static, tokens = evaluate(lm.model, data, 5)
        dynamic = dynamic_evaluate(lm.model, data, train_ids, bptt=5, lr=1e-12, stat_batches=2)
        assert dynamic == (pytest.approx(static, rel=1e-6), tokens)


def test_full_decay_forgets_each_step(lm, repeated, train_ids):
    # decay 1 pulls each weight back to its trained value (where rms is at least its mean).
    slight, _ = dynamic_evaluate(lm.model, repeated, train_ids, lr=1e-2, decay=1.0,
                                 stat_batches=10)
    free, _ = dynamic_evaluate(lm.model, repeated, train_ids, lr=1e-2, decay=0.0,
                               stat_batches=10)
    assert free < slight


def test_steps_follow_the_papers_update(lm, train_ids):
    # Three segments scored by hand, with the update written out as in the module docstring:
    # the third is scored after a step whose weights have moved away from theta_0.
    from lstmlm.dynamic import STAT_BATCH_SIZE, adaptable_copy

    lr, decay, eps = 1e-2, 0.1, 2e-5
    text = train_ids[:16].unsqueeze(1)
    model = adaptable_copy(lm.model)
    stat_batch = min(STAT_BATCH_SIZE, train_ids.numel() // 6)
    rms = gradient_rms(adaptable_copy(lm.model), batchify(train_ids, stat_batch), 5, 2)
    mean = torch.cat([r.flatten() for r in rms]).mean()
    trained = [p.detach().clone() for p in model.parameters()]
    hidden, losses = model.init_hidden(1), []
    for i in (0, 5, 10):
        logits, hidden = model(text[i:i + 5], [(h.detach(), c.detach()) for h, c in hidden])
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)),
                                                 text[i + 1:i + 6].view(-1))
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, p0, g, r in zip(model.parameters(), trained, grads, rms):
                rate = decay * torch.minimum(r / mean, torch.tensor(1 / decay))
                p.add_(-lr * g / (r + eps) + rate * (p0 - p))
    loss, tokens = dynamic_evaluate(lm.model, text, train_ids, bptt=5, lr=lr, decay=decay,
                                    stat_batches=2, epsilon=eps)
    assert tokens == 15
    assert loss == pytest.approx(sum(losses) / 3, rel=1e-6)


def test_gradient_rms_is_the_root_mean_square(lm, train_ids):
    from lstmlm.dynamic import adaptable_copy

    model = adaptable_copy(lm.model)
    data = batchify(train_ids, 4)
    rms = gradient_rms(model, data, 5, max_batches=3)
    squares = [torch.zeros_like(p) for p in model.parameters()]
    hidden = model.init_hidden(4)
    for i in (0, 5, 10):  # three windows by hand, the state carried between them
        logits, hidden = model(data[i:i + 5], [(h.detach(), c.detach()) for h, c in hidden])
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), data[i + 1:i + 6].reshape(-1)),
            list(model.parameters()))
        squares = [s + g ** 2 for s, g in zip(squares, grads)]
    for r, s in zip(rms, squares):  # the fused loss sums in another order than autograd's
        torch.testing.assert_close(r, (s / 3).sqrt(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lr, decay, bptt, batches, message", [
    (0.0, 0.002, 5, 10, "learning rate must be > 0"),
    (-1e-3, 0.002, 5, 10, "learning rate must be > 0"),
    (math.nan, 0.002, 5, 10, "learning rate must be > 0"),
    (1e-3, -0.1, 5, 10, r"decay must be in \[0, 1\]"),
    (1e-3, 1.5, 5, 10, r"decay must be in \[0, 1\]"),
    (1e-3, 0.002, 0, 10, "segment length must be at least 1"),
    (1e-3, 0.002, 5, 0, "at least 1 training batch"),
])
def test_refuses_impossible_settings(lr, decay, bptt, batches, message):
    with pytest.raises(LstmlmError, match=message):
        check_dynamic(lr, decay, bptt, batches)


# ---- CLI --------------------------------------------------------------------------------------


def test_evaluate_dynamic_leaves_the_run_untouched(capsys, tiny_run, tmp_path):
    run_dir = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    before = snapshot(run_dir)
    code, out, err = run(capsys, "evaluate", run_dir, "--json", "--batch-size", "1")
    static = json.loads(out)
    static.pop("seconds")
    code, out, err = run(capsys, "evaluate", run_dir, "--dynamic", "--dynamic-lr", "1e-3",
                         "--dynamic-batches", "5", "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert result["batch_size"] == 1 and result["tokens"] == static["tokens"]
    assert result["dynamic"] == {"lr": 1e-3, "decay": 0.002, "bptt": 5, "stat_batches": 5}
    assert result["ppl"] < static["ppl"]  # the test split is the training text's twin
    assert snapshot(run_dir) == before
    again = json.loads(run(capsys, "evaluate", run_dir, "--json", "--batch-size", "1")[1])
    assert again.pop("seconds") >= 0 and again == static


@pytest.mark.parametrize("args, message", [
    (["--dynamic", "--dynamic-lr", "0"], "learning rate must be > 0"),
    (["--dynamic", "--dynamic-lr", "-1"], "learning rate must be > 0"),
    (["--dynamic", "--dynamic-decay", "2"], "decay must be in [0, 1]"),
    (["--dynamic", "--dynamic-bptt", "0"], "segment length must be at least 1"),
    (["--dynamic-lr", "1e-3"], "--dynamic-lr only applies with --dynamic"),
])
def test_dynamic_mistakes(capsys, tiny_run, args, message):
    code, out, err = run(capsys, "evaluate", tiny_run, *args)
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("lstmlm: error: ") and message in err
