import pytest
import torch

from lstmlm.regularizers import (activation_penalty, drop_connect, dropout, embedding_dropout_mask,
                                 keep_mask, locked_dropout)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_mask_keeps_one_minus_p_scaled(p):
    mask = keep_mask((200, 500), p, torch.empty(0, dtype=torch.float64),
                     torch.Generator().manual_seed(0))
    assert mask.dtype == torch.float64
    assert mask.unique().tolist() == [0.0, 1 / (1 - p)]
    assert (mask == 0).double().mean().item() == pytest.approx(p, abs=0.01)  # 100k draws
    assert keep_mask((3,), p, torch.empty(0, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dropout_from_a_generator_repeats_and_passes_gradients_through_the_mask():
    x = torch.randn(30, 40, requires_grad=True)
    first = dropout(x, 0.5, True, torch.Generator().manual_seed(3))
    again = dropout(x, 0.5, True, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    first.sum().backward()
    assert torch.equal(x.grad, (first != 0).float() * 2.0)
    assert dropout(x, 0.5, False) is x and dropout(x, 0.0, True) is x


@pytest.mark.parametrize("drop", [dropout, locked_dropout])
def test_a_given_generator_draws_the_mask_not_the_global_one(drop):
    """Under DDP each rank's masks come from its own generator (seeded by rank and step)."""
    x = torch.ones(7, 3, 50)
    torch.manual_seed(0)
    first = drop(x, 0.5, True, torch.Generator().manual_seed(3))
    torch.manual_seed(1)  # another global state: the same mask
    assert torch.equal(drop(x, 0.5, True, torch.Generator().manual_seed(3)), first)
    assert not torch.equal(drop(x, 0.5, True, torch.Generator().manual_seed(4)), first)


def test_locked_dropout_mask_is_constant_over_time():
    torch.manual_seed(0)
    x = torch.ones(7, 3, 50)
    y = locked_dropout(x, 0.5, training=True)
    assert torch.equal(y, y[:1].expand_as(y))  # every time step has the same mask
    assert set(y.unique().tolist()) == {0.0, 2.0}  # kept units scaled by 1/(1-p)
    assert not torch.equal(y[:, 0], y[:, 1])  # masks differ between sequences
    assert 0.3 < (y[0] == 0).float().mean() < 0.7


def test_locked_dropout_off_in_eval():
    x = torch.randn(4, 2, 5)
    assert locked_dropout(x, 0.5, training=False) is x


def test_embedding_dropout_mask_drops_whole_words():
    torch.manual_seed(0)
    weight = torch.randn(200, 8)
    mask = embedding_dropout_mask(weight, 0.25, training=True)
    assert mask.shape == (200, 1)
    dropped = mask.squeeze(1) == 0
    assert 0.1 < dropped.float().mean() < 0.4
    assert torch.all(mask[~dropped] == 1 / 0.75)
    assert embedding_dropout_mask(weight, 0.25, training=False) is None
    assert embedding_dropout_mask(weight, 0.0, training=True) is None


def test_drop_connect_scales_kept_weights():
    torch.manual_seed(0)
    weight = torch.ones(40, 40)
    dropped = drop_connect(weight, 0.5, training=True)
    assert set(dropped.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(drop_connect(weight, 0.5, training=False), weight)


def test_ar_tar_exact_values():
    dropped = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]])  # (time 2, batch 1, features 2)
    raw = torch.tensor([[[1.0, 1.0]], [[2.0, 3.0]]])
    # AR: mean of squares = (1 + 4 + 9 + 0) / 4 = 3.5; TAR: mean((1, 2)²) = 2.5
    assert activation_penalty(dropped, raw, 2.0, 0.0).item() == pytest.approx(7.0)
    assert activation_penalty(dropped, raw, 0.0, 1.0).item() == pytest.approx(2.5)
    assert activation_penalty(dropped, raw, 2.0, 1.0).item() == pytest.approx(9.5)
    assert activation_penalty(dropped, raw, 0.0, 0.0).item() == 0.0
