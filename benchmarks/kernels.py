#!/usr/bin/env python
"""The pieces of a training or evaluation step that are not the big matrix products, each
against the alternative lstmlm chose not to use, at lstm-baseline's size (700 rows, 400 ->
33,278 words, 26M parameters). Medians of interleaved repetitions, in one process:

    python benchmarks/kernels.py
    python benchmarks/kernels.py --reps 3 --threads 1      # quicker

- optimizer step over the decoder's and the embedding's weights: torch's default SGD and Adam
  against the fused ones (`fused=True`, what lstmlm.optim uses);
- a chunk's softmax: along the vocabulary of (vocabulary, rows) logits against along the rows
  of (rows, vocabulary) ones, padded to 16 floats (what lstmlm.fused uses), and log_softmax +
  exp (what it used to compute);
- a tile's log-sum-exp (evaluation's loss, lstmlm.fused.target_log_probs), 700 rows x 512
  words: torch.logsumexp against reading it off the tile's log_softmax;
- a dropout mask for a 2048 x 512 weight: bernoulli_ (and F.dropout) against 16-bit random
  integers >= p (lstmlm.regularizers.keep_mask);
- the gradient of an embedding whose rows are also the adaptive softmax's word matrices
  (wt2-cpu-hour: 33,278 x 256, head 2,000 words, tails 8,000 and 23,278): the matrices as one
  slice per cluster, one split, and one gradient tensor that the matrices' products write and
  the lookup adds its rows into (lstmlm.fused.tied_lookup and split_linear);
- and, for scale, matrix-product-bound pieces with their GFLOP/s: the decoder's forward product
  into either layout of the chunk; evaluation's loss of the chunk, its softmax in memory
  against `target_log_probs`'s tiles; the forward pass of an nn.LSTM(1150, 1150) over 70 time
  steps at batch 10 (AWD-LSTM's validation batch) and batch 80 (its training batch), one
  10-row recurrent product of that LSTM alone (also by kernels that pack its weight for 10
  rows: MKL's, oneDNN's and, with --compiled, torch.compile's), and a 2048³ product for
  scale; and a
  memory copy, in GB/s read + written, the bound of a product whose weights stream from memory
  for few rows (at batch 10, the LSTM reads its 21 MB recurrent matrix at every time step);
  and how fast 8, 16, 21 and 32 MB are read again and again: how much of such a matrix the L3
  cache keeps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lstmlm.fused import split_linear, target_log_probs, tied_lookup
from lstmlm.regularizers import keep_mask

ROWS, HIDDEN, VOCAB, EMBEDDING = 700, 400, 33278, 380


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def optimizer_cases() -> dict:
    params = [torch.nn.Parameter(torch.randn(VOCAB, HIDDEN)),
              torch.nn.Parameter(torch.randn(VOCAB, EMBEDDING))]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    cases = {}
    for fused in (False, True):
        sgd = torch.optim.SGD(params, lr=1e-3, weight_decay=1e-6, fused=fused)
        adam = torch.optim.Adam(params, lr=1e-6, fused=fused)
        cases[f"SGD step, {'fused' if fused else 'default'}"] = sgd.step
        cases[f"Adam step, {'fused' if fused else 'default'}"] = adam.step
    return cases


def softmax_cases() -> dict:
    padded_rows = -(-ROWS // 16) * 16
    vocab_major = torch.randn(VOCAB, padded_rows)
    rows_major = torch.randn(ROWS, -(-VOCAB // 16) * 16)
    source = torch.randn(VOCAB, padded_rows)

    def log_softmax_then_exp():
        vocab_major.copy_(source)
        torch.log_softmax(vocab_major, 0, out=vocab_major).exp_()

    def copy_only():
        vocab_major.copy_(source)

    return {"softmax of (vocabulary, rows) along dim 0":
            lambda: torch.softmax(vocab_major, 0, out=vocab_major),
            "log_softmax + exp of (vocabulary, rows), plus a copy": log_softmax_then_exp,
            "the copy alone": copy_only,
            "softmax of (rows, padded vocabulary) along dim 1":
            lambda: torch.softmax(rows_major, 1, out=rows_major)}


def tile_cases() -> dict:
    tile, log_softmax, out = torch.randn(ROWS, 512), torch.empty(ROWS, 512), torch.empty(ROWS)

    def read_off_log_softmax():
        torch.log_softmax(tile, 1, out=log_softmax)
        torch.sub(tile[:, 0], log_softmax[:, 0], out=out)

    return {"torch.logsumexp": lambda: torch.logsumexp(tile, 1, out=out),
            "logit - log_softmax (lstmlm.fused)": read_off_log_softmax}


def mask_cases() -> dict:
    weight = torch.randn(4 * 512, 512)
    return {"bernoulli_ mask": lambda: torch.empty_like(weight).bernoulli_(0.7),
            "F.dropout": lambda: F.dropout(weight, 0.3, True),
            "keep_mask (16-bit integers >= p)": lambda: keep_mask(weight.shape, 0.3, weight)}


def tied_gradient_cases() -> dict:
    """Forward + backward of an embedding lookup of 700 tokens and the three word matrices'
    products, on as many rows as WikiText-2's words in each cluster get."""
    bounds, dim = [0, 2000, 10000, VOCAB], 256
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    weight = torch.nn.Parameter(torch.randn(VOCAB, dim) * 0.1)
    bias = torch.nn.Parameter(torch.zeros(VOCAB))
    tokens = torch.randint(VOCAB, (ROWS,))
    features = [torch.randn(rows, dim) for rows in (ROWS, 90, 40)]

    def backward(embedded, logits):
        total = embedded.sum() + sum(out.sum() for out in logits)
        weight.grad = bias.grad = None
        total.backward()

    def apart(matrices):
        return backward(F.embedding(tokens, weight), [
            F.linear(x, matrix, b) for x, matrix, b in zip(features, matrices, bias.split(sizes))])

    def one_gradient_tensor():
        embedded, tied_weight = tied_lookup(weight, tokens)
        return backward(embedded, split_linear(features, tied_weight, bias, sizes))

    return {"one slice per cluster": lambda: apart(
                [weight[lo:hi] for lo, hi in zip(bounds, bounds[1:])]),
            "one split": lambda: apart(weight.split(sizes)),
            "tied_lookup + split_linear (lstmlm.fused)": one_gradient_tensor}


def product_cases(compiled: bool = False) -> dict:
    """name -> (function, FLOPs or bytes moved, unit)"""
    weight, bias, x = torch.randn(VOCAB, HIDDEN), torch.randn(VOCAB), torch.randn(ROWS, HIDDEN)
    targets = torch.randint(VOCAB, (ROWS,))
    vocab_major = torch.empty(VOCAB, -(-ROWS // 16) * 16)[:, :ROWS]
    padded = torch.empty(ROWS, -(-VOCAB // 16) * 16)
    rows_major = padded[:, :VOCAB]
    decoder_flops = 2 * ROWS * HIDDEN * VOCAB

    def softmax_in_memory():
        torch.addmm(bias, x, weight.t(), out=rows_major)
        padded[:, VOCAB:] = -torch.inf
        torch.softmax(padded, 1, out=padded)
        return -rows_major[torch.arange(ROWS), targets].log().mean()

    cases = {"decoder product into (vocabulary, rows)": (
                 lambda: torch.addmm(bias.unsqueeze(1), weight, x.t(), out=vocab_major),
                 decoder_flops, "GFLOP/s"),
             "decoder product into (rows, padded vocabulary)": (
                 lambda: torch.addmm(bias, x, weight.t(), out=rows_major), decoder_flops, "GFLOP/s"),
             "evaluation loss, softmax of the chunk in memory": (
                 softmax_in_memory, decoder_flops, "GFLOP/s"),
             "evaluation loss, target_log_probs (in tiles)": (
                 lambda: target_log_probs(x, weight, bias, targets), decoder_flops, "GFLOP/s")}
    lstm = torch.nn.LSTM(1150, 1150)
    for batch in (10, 80):
        tokens = torch.randn(70, batch, 1150)

        def forward(tokens=tokens):
            with torch.no_grad():
                lstm(tokens)

        cases[f"nn.LSTM(1150, 1150) forward, 70 x {batch} tokens"] = (
            forward, 2 * 4 * 2300 * 1150 * 70 * batch, "GFLOP/s")
    hidden, recurrent = torch.randn(10, 1150), torch.randn(4600, 1150)
    recurrent_flops = 2 * 10 * 1150 * 4600
    cases["one recurrent product, 10 x 1150 by 1150 x 4600"] = (
        lambda: torch.mm(hidden, recurrent.t()), recurrent_flops, "GFLOP/s")
    for name, product in packed_products(hidden, recurrent, compiled).items():
        cases[f"  the same, {name}"] = (product, recurrent_flops, "GFLOP/s")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    cases["2048 x 2048 by 2048 x 2048, for scale"] = (lambda: torch.mm(a, b), 2 * 2048**3,
                                                        "GFLOP/s")
    source, destination = torch.randn(64 * 2**20), torch.empty(64 * 2**20)  # 256 MB each
    cases["copy of 256 MB"] = (lambda: destination.copy_(source), 2 * source.nbytes, "GB/s")
    for mb in (8, 16, 21, 32):  # read 10 times in a row: from the cache, where it fits
        buffer = source[: mb * 2**18]
        cases[f"10 reads of {mb} MB (sum)"] = (
            lambda buffer=buffer: [buffer.sum() for _ in range(10)], 10 * buffer.nbytes, "GB/s")
    return cases


def packed_products(hidden, weight, compiled: bool = False) -> dict:
    """hidden @ weight.t() by kernels that lay the weight out once for a fixed number of rows,
    as an LSTM's recurrent product could: MKL's and oneDNN's packed matrix products (torch's
    private ops, where this build has them) and, with `compiled`, the matrix-product kernel
    torch.compile generates and picks when it may try its own (needs a C++ compiler)."""
    rows, products = hidden.shape[0], {}
    if hasattr(torch.ops.mkl, "_mkl_linear") and torch.backends.mkl.is_available():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        products[f"MKL, weight packed for {rows} rows"] = (
            lambda: torch.ops.mkl._mkl_linear(hidden, packed, weight, None, rows))
    if hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available():
        reordered = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        products[f"oneDNN, weight reordered for {rows} rows"] = (
            lambda: torch.ops.mkldnn._linear_pointwise(hidden, reordered, None, "none", [], ""))
    if compiled:
        import torch._inductor.config as inductor
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).eval()
        linear.weight.data.copy_(weight)
        with torch.no_grad(), inductor.patch(freezing=True, max_autotune=True,
                                             max_autotune_gemm_backends="CPP,ATEN"):
            fast = torch.compile(linear)
            fast(hidden)

        def run_compiled():
            with torch.no_grad():
                return fast(hidden)
        products["torch.compile's own kernel"] = run_compiled
    expected = hidden @ weight.t()
    for name, product in products.items():
        torch.testing.assert_close(product(), expected, rtol=1e-4, atol=1e-4, msg=name)
    return products


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=11, help="timed repetitions of each (default 11)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--compiled", action="store_true",
                   help="also time torch.compile's own kernel for the 10-row recurrent product "
                        "(about half a minute to compile; needs a C++ compiler)")
    args = p.parse_args(argv)
    if args.reps < 1 or (args.threads is not None and args.threads < 1):
        p.error("--reps and --threads must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} (interleaved)")
    products = product_cases(args.compiled)
    for title, cases in (("optimizer step, 26M parameters", optimizer_cases()),
                         (f"softmax of a {ROWS}-row chunk", softmax_cases()),
                         (f"log-sum-exp of a {ROWS} x 512 tile", tile_cases()),
                         ("dropout mask, 2048 x 512", mask_cases()),
                         ("tied embedding's gradient, 33,278 x 256", tied_gradient_cases()),
                         ("matrix products and memory",
                          {k: fn for k, (fn, _, _) in products.items()})):
        times = {name: [] for name in cases}
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.reps):
            for name, fn in cases.items():
                times[name].append(timed_ms(fn))
        print(f"\n{title}:")
        for name, ts in times.items():
            ms = statistics.median(ts)
            rate = ""
            if name in products:
                _, amount, unit = products[name]
                rate = f"  {amount / ms / 1e6:6.1f} {unit}"
            print(f"  {name:<52} {ms:8.2f} ms{rate}")


if __name__ == "__main__":
    main()
