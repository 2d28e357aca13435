import torch

from lstmlm.optim import WeightAverage, nonmono_triggered


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
