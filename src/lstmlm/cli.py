"""The `lstmlm` command: presets, train, finetune, evaluate, score, export, generate, ablate,
report.

User mistakes end with one line on stderr (`lstmlm: error: ...`) and exit status 1, never a
traceback; argparse's usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from . import __version__
from .ablate import run_plan
from .allocator import keep_freed_memory
from .api import load
from .cache import (DEFAULT_LAMBDA, DEFAULT_THETA, DEFAULT_WINDOW, cache_evaluate, cache_search,
                    check_cache)
from .checkpoint import RUN_FILES, load_run, read_run_config
from .config import FIELDS, list_presets, load_preset, parse_assignment, parse_value
from .data import batchify, read_split, read_text, split_lines
from .datasets import resolve_data
from .dynamic import (DEFAULT_BPTT, DEFAULT_DECAY, DEFAULT_LR, DEFAULT_STAT_BATCHES, check_dynamic,
                      dynamic_evaluate)
from .errors import LstmlmError
from .evaluate import evaluate, perplexity
from .export import check_export, export_model
from .generate import check_sampling, detokenize, sample
from .report import report
from .train import run_finetune, run_training


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors that point at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def given(value: str) -> str:
    """A path or name: an empty one (an unset shell variable) must not mean the default."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty")
    return value


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (override any preset field)")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="set any config field, e.g. --set dropout_output=0.3 (repeatable)")
    for name, f in FIELDS.items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"cfg_{name}", metavar="V",
                           help=f"{f.metadata['help']} (default {f.default!r})")


def config_overrides(args: argparse.Namespace) -> dict:
    overrides = dict(parse_assignment(text) for text in args.set)
    for name in FIELDS:
        text = getattr(args, f"cfg_{name}")
        if text is not None:
            overrides[name] = parse_value(name, text, f"--{name.replace('_', '-')}")
    return overrides


def cmd_presets(args) -> None:
    presets = list_presets()
    width = max(len(name) for name, _ in presets)
    for name, description in presets:
        print(f"{name:<{width}}  {description}")


def cmd_train(args) -> None:
    overrides = config_overrides(args)
    if args.resume is not None:
        if args.preset is not None or args.out is not None:
            raise LstmlmError("--resume continues a run as it was; drop --preset and --out")
        results = run_training(resume=Path(args.resume), overrides=overrides)
    elif args.preset is None and overrides.get("init_from"):
        # The run's own settings, so that its shape fits; flags change the rest.
        base = Path(overrides["init_from"])
        cfg = read_run_config(base)[0]
        cfg.finetune = False
        data = Path(overrides.get("data", cfg.data)).stem
        out = Path(args.out) if args.out is not None else Path("runs") / f"{base.name}-{data}"
        results = run_training(cfg, out=out, overrides=overrides)
    else:
        preset = args.preset if args.preset is not None else "lstm-baseline"
        cfg = load_preset(preset)
        out = Path(args.out) if args.out is not None else Path("runs") / Path(preset).stem
        results = run_training(cfg, out=out, overrides=overrides)
    print_results(results)


def print_results(results: dict) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the same results
        print_json(results)


def print_json(obj) -> None:
    """One JSON object on stdout, with inf and nan as null: `Infinity` is not JSON, and strict
    parsers refuse it (a cache with lambda 1 gives an infinite loss to a word it never saw)."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [finite(v) for v in value]
        return value

    print(json.dumps(finite(obj)))


def cmd_finetune(args) -> None:
    out = Path(args.out) if args.out is not None else None
    print_results(run_finetune(Path(args.run_dir), out, config_overrides(args)))


def check_evaluate_options(args) -> None:
    """Refuse impossible or unused cache / dynamic evaluation options before loading anything."""
    cache = args.cache or args.cache_search
    if cache and args.dynamic:
        raise LstmlmError("--cache and --dynamic cannot be combined; choose one")
    for prefix, on in (("cache", cache), ("dynamic", args.dynamic)):
        used = [k for k, v in vars(args).items()
                if k.startswith(prefix + "_") and v is not None and v is not False]
        if used and not on:
            flag = "--" + used[0].replace("_", "-")
            raise LstmlmError(f"{flag} only applies with --{prefix}")
    if args.cache_search and (args.cache_theta is not None or args.cache_lambda is not None):
        raise LstmlmError("--cache-search chooses theta and lambda; drop --cache-theta and "
                          "--cache-lambda")
    defaults = {"cache_window": DEFAULT_WINDOW, "cache_theta": DEFAULT_THETA,
                "cache_lambda": DEFAULT_LAMBDA, "dynamic_lr": DEFAULT_LR,
                "dynamic_decay": DEFAULT_DECAY, "dynamic_bptt": DEFAULT_BPTT,
                "dynamic_batches": DEFAULT_STAT_BATCHES}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_cache(args.cache_window, args.cache_theta, args.cache_lambda)
    check_dynamic(args.dynamic_lr, args.dynamic_decay, args.dynamic_bptt, args.dynamic_batches)


def cmd_evaluate(args) -> None:
    check_evaluate_options(args)
    cache = args.cache or args.cache_search
    cfg, vocab, model = load_run(Path(args.run_dir), args.device)
    corpus = resolve_data(args.data) if args.data else resolve_data(cfg.data, recorded=True)

    def encoded(split):
        """(where the split comes from, its token ids on the model's device, unknown words)"""
        source, lines = read_split(corpus, split)
        ids, unknown = vocab.encode(line.split() for line in lines)
        return source, ids.to(model.embedding.weight.device), unknown

    source, ids, unknown = encoded(args.split)
    batch_size = args.batch_size
    if batch_size is None:  # not `or`: --batch-size 0 is a mistake, not the default
        if cache or args.dynamic:
            batch_size = 1  # the papers' setting: one stream, one cache / one adapting model
        else:
            batch_size = cfg.valid_batch_size if args.split == "valid" else cfg.test_batch_size
    if batch_size < 1:
        raise LstmlmError(f"--batch-size must be at least 1, got {batch_size}")
    data = batchify(ids, batch_size, source, "--batch-size")
    result = {"split": args.split}
    start = time.perf_counter()
    if cache:
        if args.cache_search:
            valid_source, valid = ((source, ids) if args.split == "valid"
                                   else encoded("valid")[:2])
            grid = cache_search(model, batchify(valid, batch_size, valid_source, "--batch-size"),
                                cfg.bptt, args.cache_window, progress="valid, cache search")
            args.cache_theta, args.cache_lambda = grid[0]["theta"], grid[0]["lambda"]
            result["cache_search"] = [{**r, "ppl": perplexity(r["loss"])} for r in grid]
            if not args.json:
                print(f"cache search on valid: best theta {args.cache_theta} lambda "
                      f"{args.cache_lambda} (valid perplexity {perplexity(grid[0]['loss']):.2f}, "
                      f"{len(grid)} pairs tried)")
        loss, tokens = cache_evaluate(model, data, cfg.bptt, args.cache_window, args.cache_theta,
                                      args.cache_lambda, progress=f"{args.split}, cache")
        result["cache"] = {"window": args.cache_window, "theta": args.cache_theta,
                           "lambda": args.cache_lambda}
        method = (f", cache window {args.cache_window} theta {args.cache_theta} "
                  f"lambda {args.cache_lambda}")
    elif args.dynamic:
        train = encoded("train")[1]
        loss, tokens = dynamic_evaluate(model, data, train, args.dynamic_bptt, args.dynamic_lr,
                                        args.dynamic_decay, args.dynamic_batches,
                                        progress=f"{args.split}, dynamic")
        result["dynamic"] = {"lr": args.dynamic_lr, "decay": args.dynamic_decay,
                             "bptt": args.dynamic_bptt, "stat_batches": args.dynamic_batches}
        method = f", dynamic lr {args.dynamic_lr} decay {args.dynamic_decay}"
    else:
        loss, tokens = evaluate(model, data, cfg.bptt, progress=args.split)
        method = ""
    seconds = time.perf_counter() - start
    # As in the reference code: each stream's first token is read but not predicted, and the
    # tokens that do not fill a last row are left out; on a long split, a handful.
    left_out = len(ids) - 1 - tokens
    result.update({"loss": loss, "ppl": perplexity(loss), "tokens": tokens,
                   "tokens_left_out": left_out, "unknown_words": unknown,
                   "batch_size": batch_size, "data": source,
                   "seconds": round(seconds, 1)})
    if args.json:
        print_json(result)
        return
    notes = [f"{n:,} {what}" for n, what in ((unknown, "unknown words read as <unk>"),
                                             (left_out, "tokens not scored (batch split)"))
             if n]
    print(f"{args.split}: loss {loss:.4f} | perplexity {perplexity(loss):.2f} | "
          f"{tokens:,} tokens (batch size {batch_size}{method}) | {seconds:.1f} s"
          + "".join(f" | {note}" for note in notes))


def read_input(source: str) -> str:
    """The UTF-8 text of FILE, or of stdin for '-'; one clear line for anything else."""
    text = read_text(source)
    if not text.strip():
        raise LstmlmError(f"{'stdin' if source == '-' else source}: no text to score (the input "
                          "is empty)")
    return text


def cmd_score(args) -> None:
    lm = load(args.run_dir, args.device)
    lines = split_lines(read_input(args.file))
    results = lm.score(lines, continue_state=args.continue_state, per_token=args.per_token,
                       progress="score")
    logprob = sum(r["logprob"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    total = {"logprob": logprob, "tokens": tokens, "ppl": perplexity(-logprob / tokens)}
    if args.json:
        print_json({"lines": results, "total": total, "continue_state": args.continue_state})
        return
    print(f"{'logprob':>10} {'tokens':>6} {'ppl':>9}  text")
    for r in results:
        print(f"{r['logprob']:10.4f} {r['tokens']:6d} {r['ppl']:9.2f}  {r['text']}")
        for t in r.get("per_token", []):
            print(f"{t['logprob']:10.4f} {'':6} {'':9}    {t['token']}")
    print(f"total: logprob {logprob:.4f} (natural log) | {tokens:,} tokens | "
          f"perplexity {perplexity(-logprob / tokens):.2f}")


def cmd_export(args) -> None:
    out, run_dir = Path(args.out), Path(args.run_dir)
    if out.name in RUN_FILES and out.resolve().parent == run_dir.resolve():
        raise LstmlmError(f"--out {out} is one of the run's own files; write the export to "
                          f"another name, e.g. {run_dir / 'model.pt'}")
    check_export(args.format, out)
    _, vocab, model = load_run(run_dir)
    written = export_model(model, args.format, out, vocab.words)
    print(f"wrote {written} ({args.format}); inputs tokens (time, batch) and h0, c0, ... "
          f"(1, batch, size) per layer; vocabulary: {run_dir / 'vocab.txt'}")


def cmd_generate(args) -> None:
    check_sampling(args.max_tokens, args.temperature, args.top_k, args.top_p, args.num_samples,
                   args.seed)
    lm = load(args.run_dir, args.device)
    prompt_ids = lm.encode(args.prompt)
    steps = sample(lm.model, prompt_ids, args.max_tokens, args.temperature, args.top_k,
                   args.top_p, args.num_samples, args.seed)
    # The prompt as given, but for trailing spaces; after a line break, no space before a word.
    prompt = args.prompt.rstrip(" \t")
    separator = "" if prompt.endswith("\n") or not prompt else " "
    if args.num_samples == 1:  # stream each word as soon as it is sampled
        print(prompt, end="", flush=True)
        space = separator
        for ids in steps:
            word = lm.vocab.words[ids[0]]
            print("\n" if word == "<eos>" else space + word, end="", flush=True)
            space = "" if word == "<eos>" else " "  # no space at the start of a line
        print()
        return

    rows = torch.stack(list(steps), dim=1).tolist()
    for i, row in enumerate(rows):
        print(f"--- sample {i + 1} ---")
        text = detokenize(lm.vocab.decode(row))
        print(prompt + ("" if text.startswith("\n") else separator) + text)


def cmd_ablate(args) -> None:
    overrides = config_overrides(args)
    if args.minutes_per_run is not None:
        overrides["max_minutes"] = args.minutes_per_run
    if "data" not in overrides:
        raise LstmlmError("ablate needs --data: a data directory or a dataset name "
                          "(wikitext-2, wikitext-103, ptb)")
    status = run_plan(args.plan, Path(args.out), overrides)
    table = Path(args.out) / "results.md"
    if table.is_file():  # not yet if the first run was stopped at once
        print(table.read_text(encoding="utf-8"), end="")
    if not status["plots"]:
        print("lstmlm: tables written; for the plots, pip install matplotlib", file=sys.stderr)
    if status["interrupted"]:
        print(f"lstmlm: ablation interrupted during {status['interrupted']}; rerun the same "
              "command to continue it from its last checkpoint", file=sys.stderr)
    failed = [r["name"] for r in status["runs"] if r["status"] == "failed"]
    if failed:
        raise LstmlmError(f"{len(failed)} of {len(status['runs'])} runs failed "
                          f"({', '.join(failed)}); see {table}")


def cmd_report(args) -> None:
    reference = Path(args.reference) if args.reference is not None else None
    markdown, plotted = report([Path(d) for d in args.run_dirs], Path(args.out), reference)
    print(markdown, end="")
    if not plotted:
        print("lstmlm: tables written; for the plots, pip install matplotlib", file=sys.stderr)


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where the model runs (auto: cuda when there is one)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lstmlm", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--version", action="version",
                        version=f"lstmlm {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("train", help="train a model into a run directory")
    p.add_argument("--preset", type=given,
                   help="preset name (see `lstmlm presets`) or a .toml file; default "
                        "lstm-baseline, or with --init-from RUN that run's settings")
    p.add_argument("--out", type=given, help="run directory to create (default runs/PRESET, "
                                             "with --init-from runs/RUN-DATA)")
    p.add_argument("--resume", type=given, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="AWD-LSTM fine-tuning of a run, into a new run directory")
    p.add_argument("run_dir", type=given)
    p.add_argument("--out", type=given, help="run directory to create (default RUN_DIR-finetune)")
    add_config_flags(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "evaluate", help="perplexity of a trained model on a split",
        description="Perplexity of a trained model on a split: plain, with a continuous cache "
                    "pointer (--cache, Grave et al. 2017) or with dynamic evaluation "
                    "(--dynamic, Krause et al. 2018). Both default to batch size 1, the "
                    "papers' setting; with --batch-size N each of the N streams has its own "
                    "cache, while dynamic evaluation adapts one model shared by the streams.")
    p.add_argument("run_dir", type=given)
    p.add_argument("--data", type=given,
                   help="data directory, text file or dataset name (default: the run's)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test")
    p.add_argument("--batch-size", type=int,
                   help="default: the run's valid/test batch size; 1 with --cache or --dynamic")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_flag(p)
    g = p.add_argument_group("continuous cache pointer")
    g.add_argument("--cache", action="store_true",
                   help="mix the model with a cache of its recent hidden states and next words")
    g.add_argument("--cache-window", type=int, metavar="W",
                   help=f"hidden states in the cache (default {DEFAULT_WINDOW})")
    g.add_argument("--cache-theta", type=float, metavar="T",
                   help=f"sharpness of the cache's attention (default {DEFAULT_THETA})")
    g.add_argument("--cache-lambda", type=float, metavar="L",
                   help=f"weight of the cache in the mixture, in [0, 1] (default {DEFAULT_LAMBDA})")
    g.add_argument("--cache-search", action="store_true",
                   help="choose theta and lambda on the valid split (small grid), then evaluate "
                        "--split with the best pair")
    g = p.add_argument_group("dynamic evaluation")
    g.add_argument("--dynamic", action="store_true",
                   help="adapt a copy of the weights to the text as it is scored")
    g.add_argument("--dynamic-lr", type=float, metavar="LR",
                   help=f"step size (default {DEFAULT_LR})")
    g.add_argument("--dynamic-decay", type=float, metavar="D",
                   help=f"pull toward the trained weights, in [0, 1] (default {DEFAULT_DECAY})")
    g.add_argument("--dynamic-bptt", type=int, metavar="N",
                   help=f"tokens per segment, one update each (default {DEFAULT_BPTT})")
    g.add_argument("--dynamic-batches", type=int, metavar="N",
                   help="training batches (100 streams x --dynamic-bptt tokens each) for the "
                        f"gradient statistics (default {DEFAULT_STAT_BATCHES})")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "score", help="log-probability of each line of a text",
        description="Score each line of FILE (or stdin): natural-log probability, tokens "
                    "(words + <eos>) and perplexity, then the total. Unknown words are scored "
                    "as <unk>; an empty line is a lone <eos>. By default each line starts from "
                    "a fresh state that has just read <eos> (independent sentences); with "
                    "--continue-state the state carries from line to line (one document).")
    p.add_argument("run_dir", type=given)
    p.add_argument("file", type=given, nargs="?", default="-", metavar="FILE",
                   help="text file, one sentence per line; - or nothing: stdin")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--per-token", action="store_true", help="also each token's log-probability")
    p.add_argument("--continue-state", action="store_true",
                   help="carry the state from line to line instead of starting each line fresh")
    add_device_flag(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "export", help="export for inference: TorchScript or ONNX",
        description="Write the model as TorchScript or ONNX with the LSTM state as explicit "
                    "inputs and outputs: forward(tokens, h0, c0, h1, c1, ...) -> (logits, "
                    "h0_out, c0_out, ...); tokens (time, batch) int64, each state (1, batch, "
                    "layer size), zeros for a fresh start. The vocabulary is RUN_DIR/vocab.txt "
                    "(line i is id i); TorchScript files also hold it as the extra file vocab.txt.")
    p.add_argument("run_dir", type=given)
    p.add_argument("--format", required=True, help="torchscript or onnx")
    p.add_argument("--out", type=given, required=True, help="file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="sample text from a trained model")
    p.add_argument("run_dir", type=given)
    p.add_argument("--prompt", default="",
                   help="words to continue (default: none, the text starts a new line)")
    p.add_argument("--max-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, help="same seed, same text")
    p.add_argument("--num-samples", type=int, default=1, help="continuations, sampled as one batch")
    add_device_flag(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "ablate", help="train every run of an ablation plan with one budget, then compare them",
        description="Train each run of PLAN into OUT/NAME with the same data, budget and seed, "
                    "then write OUT/results.csv, results.md, curves.png and ablation.png. Rerun "
                    "the same command after an interruption: finished runs are kept, an "
                    "interrupted one resumes. Config flags (--set KEY=VALUE, --hidden-size ...) "
                    "apply to every run.")
    p.add_argument("--plan", type=given, required=True,
                   help="seed (lstm-baseline, awd-1 ... awd-9), paper (awd-lstm and its "
                        "leave-one-out variants) or a plan .toml file")
    p.add_argument("--out", type=given, required=True,
                   help="directory for the runs and the report")
    p.add_argument("--minutes-per-run", type=float, metavar="M",
                   help="training budget of each run in minutes (or --epochs N, --max-steps S; "
                        "without any, each preset's own epochs)")
    add_config_flags(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("report", help="compare run directories: table and plots",
                       description="Write results.csv, results.md, curves.png and ablation.png "
                                   "comparing the given run directories.")
    p.add_argument("run_dirs", type=given, nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=given, default=".",
                   help="where to write the report (default: here)")
    p.add_argument("--reference", type=given, metavar="RUN_DIR",
                   help="the run the others are compared with (default: the first)")
    p.set_defaults(func=cmd_report)
    for p in sub.choices.values():  # so that an unknown flag is reported by its command
        p.set_defaults(command_parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    keep_freed_memory()
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, *rest, **kw: f"lstmlm: warning: {message}\n"
    try:
        args.func(args)
    except LstmlmError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the same error
            sys.stderr.write(f"lstmlm: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        print("lstmlm: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:  # torch's allocator says "allocate"
        if isinstance(e, RuntimeError) and "allocate" not in str(e):
            raise
        reason = " ".join(str(e).split("\n")[0].split()) or "MemoryError"
        print(f"lstmlm: error: out of memory ({reason}); use a smaller model, batch size or "
              "input", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `lstmlm presets | head -1`: the reader has gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the final flush
        return 141
    except OSError as e:  # what the system refuses that no check foresaw: a name too long...
        if os.environ.get("RANK", "0") == "0":
            where = f"{e.filename}: " if e.filename else ""
            sys.stderr.write(f"lstmlm: error: {where}{e.strerror or e}\n")
        return 1
    finally:
        warnings.formatwarning = format_warning
    return 0
