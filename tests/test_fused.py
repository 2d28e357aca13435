"""The fused, chunked decoder + cross-entropy equals F.cross_entropy(F.linear(...)): loss and
gradients, for any chunking, with and without a bias, with a tied weight, under no_grad, and
inside LSTMLM.loss. The tied lookup equals an embedding lookup that passes its weight on, and
split_linear equals F.linear on a split weight."""

import pytest
import torch
import torch.nn.functional as F

from lstmlm import fused
from lstmlm.config import Config
from lstmlm.fused import linear_cross_entropy, target_log_probs, tied_lookup
from lstmlm.model import LSTMLM

ROWS, IN, VOCAB = 24, 16, 50
TOL = dict(rtol=1e-5, atol=1e-6)


def inputs(bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, IN, generator=generator).requires_grad_()
    weight = (torch.randn(VOCAB, IN, generator=generator) * 0.3).requires_grad_()
    b = torch.randn(VOCAB, generator=generator).requires_grad_() if bias else None
    targets = torch.randint(VOCAB, (ROWS,), generator=generator)
    return x, weight, b, targets


def loss_and_grads(loss_fn, x, weight, bias, targets):
    params = [t for t in (x, weight, bias) if t is not None]
    loss = loss_fn(x, weight, bias, targets)
    return loss, torch.autograd.grad(3.0 * loss, params)  # a grad_output other than 1


def reference(x, weight, bias, targets):
    return F.cross_entropy(F.linear(x, weight, bias), targets)


# one row per chunk, chunks that do not divide 24, that do, exactly one chunk, more than one
@pytest.mark.parametrize("chunk", [1, 5, 7, 8, 24, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_gradients_equal_the_straightforward_ones(chunk, bias):
    args = inputs(bias)
    expected, expected_grads = loss_and_grads(reference, *args)
    loss, grads = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk), *args)
    torch.testing.assert_close(loss, expected, **TOL)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, **TOL)


def test_gradient_of_the_weight_alone():
    x, weight, bias, targets = inputs()
    x.requires_grad_(False)
    bias.requires_grad_(False)
    loss = linear_cross_entropy(x, weight, bias, targets, chunk_rows=5)
    (grad,) = torch.autograd.grad(loss, weight)
    (want,) = torch.autograd.grad(reference(x, weight, bias, targets), weight)
    torch.testing.assert_close(grad, want, **TOL)


def test_gradcheck_in_double_precision():
    x, weight, bias, targets = (t.detach().double().requires_grad_() if t.is_floating_point()
                                else t for t in inputs())
    assert torch.autograd.gradcheck(
        lambda x, w, b: linear_cross_entropy(x, w, b, targets, chunk_rows=7), (x, weight, bias))


def test_tied_weight_gets_both_gradients():
    """The decoder's weight is the embedding's Parameter: its gradient is the sum of both
    uses, as with F.linear."""
    _, weight, bias, targets = inputs()
    tokens = torch.randint(VOCAB, (ROWS,), generator=torch.Generator().manual_seed(1))

    def grads(loss_fn):
        x = torch.tanh(F.embedding(tokens, weight))
        return torch.autograd.grad(loss_fn(x, weight, bias, targets), (weight, bias))

    expected = grads(reference)
    for got, want in zip(grads(lambda *a: linear_cross_entropy(*a, chunk_rows=5)), expected):
        torch.testing.assert_close(got, want, **TOL)


def test_no_grad_computes_the_loss_only():
    x, weight, bias, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, bias, targets, chunk_rows=5)
        expected = reference(x, weight, bias, targets)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, expected, **TOL)
    plain = [t.detach() for t in (x, weight, bias)]  # nothing requires a gradient
    loss = linear_cross_entropy(*plain, targets, chunk_rows=5)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, expected, **TOL)


# a word per tile, tiles that do not divide 50 words, that do, one tile, one larger than the
# vocabulary
@pytest.mark.parametrize("tile", [1, 7, 10, 50, 64])
@pytest.mark.parametrize("chunk", [5, 24])
@pytest.mark.parametrize("bias", [True, False])
def test_target_log_probs_over_tiles_of_the_vocabulary(monkeypatch, tile, chunk, bias):
    """Evaluation's path: the log-sum-exp of each tile of words, combined, gives each row's
    target log-probability."""
    monkeypatch.setattr(fused, "VOCAB_TILE", tile)
    x, weight, b, targets = (t.detach() if t is not None else None for t in inputs(bias))
    expected = torch.log_softmax(F.linear(x, weight, b).double(), 1)
    expected = expected.gather(1, targets.unsqueeze(1)).squeeze(1)
    got = target_log_probs(x, weight, b, targets, chunk_rows=chunk)
    torch.testing.assert_close(got.double(), expected, **TOL)


def test_target_probabilities_that_underflow_keep_their_exact_log():
    """Log-probabilities come from the softmax; a target given less than 1e-30 (here about
    e^-300, half of the rows) must not come out as log 0 = -inf. Weights this large make
    float32 gradients lose digits, so they are held to the float64 ones."""
    x, weight, bias, targets = inputs()
    with torch.no_grad():
        weight.mul_(100)
        low = F.linear(x, weight, bias).argmin(1)
        targets = torch.where(torch.arange(ROWS) % 2 == 0, low, targets)
    exact = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected, expected_grads = loss_and_grads(reference, *exact, targets)
    assert expected > 100
    loss, grads = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=5),
                                 x, weight, bias, targets)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, bias, targets, chunk_rows=5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


def test_no_rows_gives_nan_and_zero_gradients_like_cross_entropy():
    _, weight, bias, targets = inputs()
    x = torch.zeros(0, IN, requires_grad=True)
    loss = linear_cross_entropy(x, weight, bias, targets[:0])
    assert torch.isnan(loss)
    grads = torch.autograd.grad(loss, (weight, bias))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_double_backward_raises():
    """Rather than gradients that silently hold no graph."""
    x, weight, bias, targets = inputs()
    loss = linear_cross_entropy(x, weight, bias, targets)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, weight, create_graph=True)


def lookup_inputs(scaled, dtype=torch.float32):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(VOCAB, IN, generator=generator, dtype=dtype).requires_grad_()
    tokens = torch.randint(VOCAB, (10, 4), generator=generator)  # 40 draws of 50: repeats
    scale = None
    if scaled:  # embedding dropout's mask: some words dropped, the rest scaled up
        scale = (torch.rand(VOCAB, 1, generator=generator, dtype=dtype) > 0.3).to(dtype) / 0.7
    return weight, tokens, scale


def straightforward_lookup(weight, tokens, scale):
    return F.embedding(tokens, weight if scale is None else weight * scale), weight


# the decoder's gradient as linear_cross_entropy or split_linear gives it, a new tensor; and
# none, a weight left out of the loss, for which autograd passes zeros
@pytest.mark.parametrize("decoder_uses_weight", [True, False])
@pytest.mark.parametrize("scaled", [False, True])
def test_tied_lookup_equals_a_lookup_and_the_weight(decoder_uses_weight, scaled):
    weight, tokens, scale = lookup_inputs(scaled)

    def outputs_and_grad(lookup):
        embedded, tied_weight = lookup(weight, tokens, scale)
        loss = embedded.tanh().sum() * 3
        if decoder_uses_weight:
            loss = loss + (tied_weight[:20] @ tied_weight[20:].T).sin().sum()
        return embedded, tied_weight, torch.autograd.grad(loss, weight)[0]

    embedded, tied_weight, grad = outputs_and_grad(tied_lookup)
    want_embedded, _, want_grad = outputs_and_grad(straightforward_lookup)
    assert torch.equal(embedded, want_embedded) and torch.equal(tied_weight, weight)
    torch.testing.assert_close(grad, want_grad, **TOL)
    assert embedded.grad_fn is tied_weight.grad_fn  # one node: one gradient tensor


@pytest.mark.parametrize("scaled", [False, True])
def test_tied_lookup_gradcheck_in_double_precision(scaled):
    weight, tokens, scale = lookup_inputs(scaled, torch.float64)

    def loss(weight):
        embedded, tied_weight = tied_lookup(weight, tokens, scale)
        return embedded.sin().sum() + (tied_weight * tied_weight.cos()).sum()

    assert torch.autograd.gradcheck(loss, (weight,))


def split_inputs(sizes, rows, dtype=torch.float32):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(VOCAB, IN, generator=generator, dtype=dtype).requires_grad_()
    bias = torch.randn(VOCAB, generator=generator, dtype=dtype).requires_grad_()
    xs = [torch.randn(n, IN, generator=generator, dtype=dtype).requires_grad_() for n in rows]
    xs[0] = xs[0].detach().view(-1, 1, IN).requires_grad_()  # leading dimensions, as F.linear's
    return xs, weight, bias, sizes


def straightforward_split_linear(xs, weight, bias, sizes):
    rest = [VOCAB - sum(sizes)]
    return [F.linear(x, w, b) for x, w, b in
            zip(xs, weight.split(sizes + rest), bias.split(sizes + rest))]


# every row in a block; rows past the blocks (an untied tail's) with no gradient; a block with
# no input rows (a tail no target fell in)
@pytest.mark.parametrize("sizes,rows", [([10, 15, 25], [7, 3, 2]), ([10, 15], [7, 3]),
                                        ([10, 15, 25], [7, 0, 2])])
def test_split_linear_equals_linear_on_a_split(sizes, rows):
    xs, weight, bias, sizes = split_inputs(sizes, rows)

    def outputs_and_grads(split_linear):
        logits = split_linear(xs, weight, bias, sizes)
        loss = sum((k + 1) * out.logsumexp(1).sum() for k, out in enumerate(logits))
        return logits, torch.autograd.grad(loss, [weight, bias, *xs])

    logits, grads = outputs_and_grads(fused.split_linear)
    want_logits, want_grads = outputs_and_grads(straightforward_split_linear)
    for got, want in zip([*logits, *grads], [*want_logits, *want_grads], strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert logits[0].grad_fn.name() == "SplitLinearBackward"
    with torch.no_grad():  # evaluation: the plain products
        for got, want in zip(fused.split_linear(xs, weight, bias, sizes), want_logits):
            torch.testing.assert_close(got, want, **TOL)


def test_split_linear_gradcheck_in_double_precision():
    xs, weight, bias, sizes = split_inputs([10, 15], [4, 3], torch.float64)

    def loss(weight, bias, *xs):
        return sum(out.sin().sum() for out in fused.split_linear(list(xs), weight, bias, sizes))

    assert torch.autograd.gradcheck(loss, (weight, bias, *xs))


def small_model(**kw):
    cfg = Config(embedding_size=8, hidden_size=8, num_layers=2, dropout_input=0.0,
                 dropout_hidden=0.0, dropout_output=0.0, **kw)
    return LSTMLM(cfg, VOCAB)


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_equals_cross_entropy_of_the_logits(tie):
    torch.manual_seed(0)
    model = small_model(tie_weights=tie)
    tokens = torch.randint(VOCAB, (6, 4))
    targets = torch.randint(VOCAB, (24,))

    def model_loss_and_grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def fused_loss():
        return model.loss(tokens, targets, model.init_hidden(4))[0]

    def plain_loss():
        logits = model(tokens, model.init_hidden(4))[0]
        return F.cross_entropy(logits.view(-1, VOCAB), targets)

    assert fused_loss().grad_fn.name() == "LinearCrossEntropyBackward"
    fused, plain = model_loss_and_grads(fused_loss), model_loss_and_grads(plain_loss)
    torch.testing.assert_close(fused[0], plain[0], **TOL)
    for got, want in zip(fused[1], plain[1], strict=True):
        torch.testing.assert_close(got, want, **TOL)


def graph_nodes(tensor):
    """Names of the autograd nodes behind a tensor."""
    names, todo, seen = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_a_tied_model_takes_its_embedding_gradient_from_one_node(softmax):
    """The speed of a tied model's step (one gradient tensor for the embedding) rests on its
    loss using the tied lookup, not a lookup of its own."""
    model = small_model(tie_weights=True, softmax=softmax, adaptive_cutoffs="10,30",
                        adaptive_div_value=1.0, dropout_embedding=0.1)
    tokens, targets = torch.randint(VOCAB, (6, 4)), torch.randint(VOCAB, (24,))
    names = graph_nodes(model.loss(tokens, targets, model.init_hidden(4))[0])
    assert "TiedLookupBackward" in names and "EmbeddingBackward0" not in names
    # the adaptive softmax's tied products write one gradient tensor, not a split's pieces
    assert ("SplitLinearBackward" in names) == (softmax == "adaptive")
    assert "SplitBackward0" not in names and "SplitWithSizesBackward0" not in names
    untied = small_model(softmax=softmax, adaptive_cutoffs="10,30")
    names = graph_nodes(untied.loss(tokens, targets, untied.init_hidden(4))[0])
    assert "TiedLookupBackward" not in names and "EmbeddingBackward0" in names


def test_model_loss_under_autocast_uses_the_straightforward_decoder():
    torch.manual_seed(0)
    model = small_model()
    tokens, targets = torch.randint(VOCAB, (6, 4)), torch.randint(VOCAB, (24,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(tokens, targets, model.init_hidden(4))[0]
    assert loss.grad_fn.name() != "LinearCrossEntropyBackward"
    loss.backward()
    assert torch.isfinite(loss)
