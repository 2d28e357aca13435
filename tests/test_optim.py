import pytest
import torch

from lstmlm.config import Config
from lstmlm.optim import WeightAverage, clip_grad_norm, make_optimizer, nonmono_triggered


def model_with_gradients(seed=0):
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3, bias=False))
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    model[0].bias.grad = None  # a parameter without a gradient is left out, as by torch
    return model


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])  # clipped (far, near); within bounds
def test_clip_grad_norm_equals_torchs(max_norm):
    ours, theirs = model_with_gradients(), model_with_gradients()
    norm = clip_grad_norm(ours.parameters(), max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    assert norm == pytest.approx(expected.item(), rel=1e-6)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_clip_grad_norm_leaves_gradients_within_bounds_untouched():
    model = model_with_gradients()
    versions = [p.grad._version for p in model.parameters() if p.grad is not None]
    clip_grad_norm(model.parameters(), 1e6)
    assert [p.grad._version for p in model.parameters() if p.grad is not None] == versions
    clip_grad_norm(model.parameters(), 0.5)
    assert all(p.grad._version > v for p, v in
               zip([p for p in model.parameters() if p.grad is not None], versions))


def test_nonmono_trigger_on_a_scripted_sequence():
    losses = [5.0, 4.0, 3.0, 3.5, 3.4, 3.3, 3.2, 3.1, 3.05]
    fired = [i for i in range(len(losses)) if nonmono_triggered(losses[:i], losses[i], 5)]
    # Check 7 (3.1) is compared with the best of checks 0-1 (4.0): no. Check 8 (3.05) with the
    # best of checks 0-2 (3.0): worse, so it fires; earlier checks have too little history.
    assert fired == [8]
    assert not nonmono_triggered([1.0, 2.0], 3.0, 2)  # needs more than nonmono checks
    assert nonmono_triggered([1.0, 2.0, 2.0], 1.5, 2)


def test_weight_average_equals_the_hand_computed_mean():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model)
    snapshots = []
    for _ in range(4):  # stand-in for optimizer steps
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        snapshots.append({k: p.detach().clone() for k, p in model.named_parameters()})
    for name in ("weight", "bias"):
        expected = torch.stack([s[name] for s in snapshots]).mean(0)
        assert torch.allclose(average.mean[name], expected, atol=1e-6)


def test_swapped_in_restores_the_current_weights():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model)
    average.update()
    with torch.no_grad():
        model.weight.add_(1.0)
    current = model.weight.detach().clone()
    with average.swapped_in():
        assert torch.equal(model.weight, average.mean["weight"])
    assert torch.equal(model.weight, current)


@pytest.mark.parametrize("name, kind, settings", [
    ("sgd", torch.optim.SGD, {"lr": 30.0, "momentum": 0.9, "weight_decay": 1.2e-6}),
    ("adam", torch.optim.Adam, {"lr": 1e-3, "weight_decay": 1e-5}),
    ("adamw", torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}),
])
def test_make_optimizer_uses_the_configs_settings(name, kind, settings):
    model = model_with_gradients()
    optimizer = make_optimizer(Config(optimizer=name, **settings), model)
    assert type(optimizer) is kind
    (group,) = optimizer.param_groups
    assert {k: group[k] for k in settings} == settings
    assert group["params"] == list(model.parameters())
