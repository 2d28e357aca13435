"""Training ops with hand-written backward passes: the same numbers as the plain autograd
graph, with less memory traffic.

`linear_cross_entropy`: the full-softmax training loss without the (tokens x vocabulary) logits.
`F.cross_entropy(decoder(x), targets)` materialises the logits, their log-softmax and, in the
backward pass, two more tensors of that size (the NLL's gradient, zero-filled, and the
log-softmax's): at AWD-LSTM's size (80 x 70 tokens, 33,278 words) each is 745 MB, written and
read again every step, and page-faulted in anew unless the allocator keeps freed memory
(allocator.py). `linear_cross_entropy` computes the same loss a chunk of rows at a time in
one reused chunk-sized buffer. The gradient of the loss with respect to a chunk's logits is
known as soon as their softmax is, softmax - onehot (over N, for the mean), so the
forward pass also computes from it the chunk's share of the gradients of x, the weight and
the bias, and the backward pass only scales them by the incoming gradient. The matrix
products are the unfused decoder's three (x W^T; then G W and G^T x, there in the backward
pass), so the FLOPs stay 3 x the forward decoder's.

The gradients are computed in the forward pass whenever autograd will want them, so a loss
that is then never back-propagated has paid for them; under `torch.no_grad()`, or with no
input requiring a gradient, only the loss is computed, by `target_log_probs`, which needs no
softmax in memory. A double backward is not supported (training never needs the gradient of
a gradient): a backward with create_graph=True raises.

`tied_lookup` and `split_linear`: an embedding tied to the decoder gets one gradient tensor,
which the decoder's products write and the lookup adds its rows into (see there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per chunk, measured with benchmarks/decoder_loss.py on 2 CPU cores (400 -> 33,278; with
# the logits then laid out (vocabulary, rows)):
# AWD-LSTM's 5,600 rows ran 4% slower in chunks of 512 and no faster in chunks of 2,048;
# 2,048 rows ran 12% slower in chunks of 256 (each chunk reads W twice and updates its
# gradient once). 1,024 rows of 33,278 words is a 136 MB buffer, and lstm-baseline's 20 x 35
# tokens fit in one chunk.
CHUNK_ROWS = 1024
# Words per tile of logits when only the loss is wanted: a chunk's tile is 1,024 x 512 floats
# (2 MB), each core's half in its 1 MB L2 cache.
VOCAB_TILE = 512


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean of `F.cross_entropy(F.linear(x, weight, bias), targets)`, x (N, in), weight
    (V, in), bias (V,) or None, targets (N,) word ids (no ignore_index); never more than
    `chunk_rows` rows of logits at once. `weight` may be shared (a tied embedding): autograd
    adds the decoder's gradient to the embedding's, as with `F.linear`."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    inputs = (x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return LinearCrossEntropy.apply(x, weight, bias, targets, chunk_rows)
    return -target_log_probs(x, weight, bias, targets, chunk_rows).mean()


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk_rows):
        loss, grads = _loss_and_grads(x, weight, bias, targets, chunk_rows,
                                      ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.rows = max(x.size(0), 1)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the saved gradients have no graph
            raise RuntimeError("linear_cross_entropy does not support double backward")
        scale = grad_loss / ctx.rows  # the forward pass kept the gradients of the summed loss
        grads = [None if g is None else g * scale for g in ctx.saved_tensors]
        return *grads, None, None


def _loss_and_grads(x, weight, bias, targets, chunk_rows, need):
    """(mean NLL, [gradients of the *summed* NLL w.r.t. x, weight, bias, None where not
    in `need`]).

    A chunk's logits are (rows, vocabulary), each buffer row padded to a multiple of 16
    floats: on 2 cores MKL computed x_c W^T (700 rows, 400 -> 33,278) into rows that start
    64-byte aligned 1.6x faster than into unpadded rows. The padding columns hold -inf, so
    the softmax can sweep whole buffer rows, contiguous, in its fast kernel (about 3x faster
    than along the vocabulary of (vocabulary, rows) logits, benchmarks/kernels.py), and
    gives them probability 0.

    The chunk's softmax is computed in place, once: it is the gradient (less the one-hot),
    and the target's log-probability is the log of its entry. Where that entry underflows
    (the model gives the target less than 1e-30) the log would lose it, so those rows'
    log-probabilities are computed again from their logits; training at a sane learning
    rate never gets there. (Checking for it costs a GPU one synchronisation per chunk.)
    """
    need_x, need_weight, need_bias = need
    n, vocab = x.size(0), weight.size(0)
    x, weight = x.contiguous(), weight.contiguous()
    chunk_rows = max(1, min(chunk_rows, n))
    row_size = _padded(vocab)
    buffer = x.new_empty(chunk_rows * row_size)  # one chunk of logits, reused
    log_probs = x.new_empty(n)  # of each row's target
    rows = torch.arange(chunk_rows, device=x.device)
    new = torch.empty_like if n else torch.zeros_like  # no rows: nan loss, zero gradients
    grad_x = new(x) if need_x else None
    grad_weight = new(weight) if need_weight else None
    grad_bias = new(bias) if need_bias else None
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        x_c, t_c, m = x[start:end], targets[start:end], end - start
        padded = buffer[: m * row_size].view(m, row_size)
        logits = padded[:, :vocab]
        if bias is None:
            torch.mm(x_c, weight.t(), out=logits)
        else:
            torch.addmm(bias, x_c, weight.t(), out=logits)
        padded[:, vocab:] = -torch.inf
        torch.softmax(padded, 1, out=padded)  # in place: each element is read, then written
        probs = padded[:, :vocab]
        target_probs = probs[rows[:m], t_c]
        log_probs[start:end] = target_probs.log()
        tiny = target_probs < 1e-30
        if tiny.any():
            lost = tiny.nonzero().squeeze(1)
            exact = torch.log_softmax(F.linear(x_c[lost], weight, bias), 1)
            log_probs[start + lost] = exact.gather(1, t_c[lost].unsqueeze(1)).squeeze(1)
        probs[rows[:m], t_c] -= 1  # softmax - onehot: d NLL / d logits
        first = 0.0 if start == 0 else 1.0  # beta 0: the empty accumulators are not read
        if need_x:
            torch.mm(probs, weight, out=grad_x[start:end])
        if need_weight:
            grad_weight.addmm_(probs.t(), x_c, beta=first)
        if need_bias:
            if start == 0:
                torch.sum(probs, 0, out=grad_bias)
            else:
                grad_bias += probs.sum(0)
    return -log_probs.mean(), [grad_x, grad_weight, grad_bias]


@torch.no_grad()
def target_log_probs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """log p(target) for each row of x (N, in) under softmax(x W^T + b), without gradients.

    Evaluation needs only each row's log-sum-exp, so the logits are computed VOCAB_TILE
    words at a time and each tile's log-sum-exp taken while the tile is still in the CPU's
    cache; the row's is the log-sum-exp of its tiles'. Neither the (rows x vocabulary)
    logits nor their softmax go to memory, and the log-probabilities are exact however
    small. A tile's log-sum-exp is read off its log-softmax (logit - log-softmax, of its
    first word): torch's log-softmax kernel ran 1.8-3 x as fast as its logsumexp in
    benchmarks/kernels.py. Off the CPU the whole vocabulary is one tile: a GPU would spend
    its time launching the small tiles' kernels.
    """
    n, vocab = x.size(0), weight.size(0)
    x, weight = x.contiguous(), weight.contiguous()
    chunk_rows = max(1, min(chunk_rows, n))
    tile_size = VOCAB_TILE if x.device.type == "cpu" else vocab
    tiles = range(0, vocab, tile_size)
    tile_lse = x.new_empty(len(tiles), n)
    logits_buffer, log_softmax_buffer = x.new_empty(2, chunk_rows * tile_size)
    for start in range(0, n, chunk_rows):
        x_c = x[start:start + chunk_rows]
        end = start + x_c.size(0)
        for j, first in enumerate(tiles):
            w = weight[first:first + tile_size]
            size = (x_c.size(0), w.size(0))
            logits = logits_buffer[: size[0] * size[1]].view(size)
            log_softmax = log_softmax_buffer[: size[0] * size[1]].view(size)
            if bias is None:
                torch.mm(x_c, w.t(), out=logits)
            else:
                torch.addmm(bias[first:first + tile_size], x_c, w.t(), out=logits)
            torch.log_softmax(logits, 1, out=log_softmax)
            torch.sub(logits[:, 0], log_softmax[:, 0], out=tile_lse[j, start:end])
    target_logits = torch.linalg.vecdot(x, weight[targets])
    if bias is not None:
        target_logits += bias[targets]
    return target_logits - torch.logsumexp(tile_lse, 0)


def _padded(rows: int) -> int:
    return -(-rows // 16) * 16


def tied_lookup(weight: torch.Tensor, tokens: torch.Tensor,
                row_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`F.embedding(tokens, weight)`, each row times its word's `row_scale` (vocab, 1) if given
    (embedding dropout); `weight` again, for the decoder tied to the embedding).

    Used apart, the lookup's backward zero-fills an embedding-sized gradient of its own for a
    few hundred rows, and autograd adds it to the decoder's: two passes over the whole
    embedding a step, about 5 % of `wt2-cpu-hour`'s step on 2 CPU cores (docs/performance.md).
    Here the backward adds the looked-up rows' gradients in place into the decoder's gradient.
    That is safe because the returned weight goes only to `linear_cross_entropy` or
    `split_linear`, whose gradient is a new tensor of their own."""
    return TiedLookup.apply(weight, tokens, row_scale)


class TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, tokens, row_scale):
        embedded = F.embedding(tokens, weight)
        scale = None if row_scale is None else F.embedding(tokens, row_scale)
        if scale is not None:
            embedded = embedded * scale
        ctx.save_for_backward(tokens, scale)
        return embedded, weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_embedded, grad_weight):
        tokens, scale = ctx.saved_tensors
        if scale is not None:
            grad_embedded = grad_embedded * scale
        # grad_weight: the decoder's own new tensor (zeros from autograd if it went unused)
        rows = grad_embedded.reshape(-1, grad_weight.size(1))
        grad_weight.index_add_(0, tokens.reshape(-1), rows)
        return grad_weight, None, None


def split_linear(inputs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                 sizes: list[int]) -> list[torch.Tensor]:
    """`[F.linear(x, w, b) for x, w, b in zip(inputs, weight.split(sizes), bias.split(sizes))]`,
    `sizes` the first rows of weight (V, in) and bias (V,) in consecutive blocks: the adaptive
    softmax's word logits, cluster by cluster, from an embedding tied to it.

    With autograd recording, the weight's gradient is one new tensor that each block's product
    writes its rows into: `split`'s backward would join the blocks' gradients with a copy of
    the whole (V, in) matrix, 10.7 ms of a 214 ms `wt2-cpu-hour` step (33,278 x 256) on 2 CPU
    cores (docs/performance.md). Under autocast the products are autocast's, through a split."""
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (weight, bias, *inputs))
    if recording and not torch.is_autocast_enabled(weight.device.type):
        return list(SplitLinear.apply(weight, bias, sizes, *inputs))
    return _split_linear(inputs, weight, bias, sizes)


def _split_linear(inputs, weight, bias, sizes):
    blocks = [*sizes, weight.size(0) - sum(sizes)]
    return [F.linear(x, w, b) for x, w, b in
            zip(inputs, weight.split(blocks), bias.split(blocks))]


class SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, sizes, *inputs):
        ctx.save_for_backward(weight, *inputs)
        ctx.sizes = sizes
        return tuple(_split_linear(inputs, weight, bias, sizes))

    @staticmethod
    def backward(ctx, *grads):
        weight, *inputs = ctx.saved_tensors
        need_weight, need_bias = ctx.needs_input_grad[:2]
        used = sum(ctx.sizes)  # rows past the blocks get a zero gradient
        grad_weight = grad_bias = None
        if need_weight:
            grad_weight = torch.empty_like(weight)
            grad_weight[used:].zero_()
        if need_bias:
            grad_bias = weight.new_empty(weight.size(0))
            grad_bias[used:].zero_()
        grad_inputs = []
        start = 0
        for g, x, size, need_input in zip(grads, inputs, ctx.sizes, ctx.needs_input_grad[3:]):
            rows = slice(start, start + size)
            start += size
            flat_g, flat_x = g.reshape(-1, size), x.reshape(-1, x.size(-1))
            if need_weight:  # with no rows in x, mm writes zeros
                torch.mm(flat_g.t(), flat_x, out=grad_weight[rows])
            if need_bias:
                torch.sum(flat_g, 0, out=grad_bias[rows])
            grad_inputs.append(g @ weight[rows] if need_input else None)
        return grad_weight, grad_bias, None, *grad_inputs
