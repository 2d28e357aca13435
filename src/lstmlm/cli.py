"""The `lstmlm` command: presets, train, evaluate, generate, ablate, report.

User mistakes end with one line on stderr (`lstmlm: error: ...`) and exit status 1, never a
traceback; argparse's usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .allocator import keep_freed_memory
from .config import FIELDS, list_presets, load_preset, parse_assignment, parse_value
from .errors import LstmlmError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors that point at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    from .train import run_training

    overrides = config_overrides(args)
    if args.resume:
        if args.preset or args.out:
            raise LstmlmError("--resume continues a run as it was; drop --preset and --out")
        results = run_training(resume=Path(args.resume), overrides=overrides)
    else:
        preset = args.preset or "lstm-baseline"
        cfg = load_preset(preset)
        out = Path(args.out) if args.out else Path("runs") / Path(preset).stem
        results = run_training(cfg, out=out, overrides=overrides)
    print(json.dumps(results))


def cmd_finetune(args) -> None:
    from .train import run_finetune

    out = Path(args.out) if args.out else None
    print(json.dumps(run_finetune(Path(args.run_dir), out, config_overrides(args))))


def cmd_evaluate(args) -> None:
    from .checkpoint import load_run
    from .data import batchify, find_split_files, read_lines
    from .datasets import resolve_data
    from .evaluate import evaluate, perplexity

    cfg, vocab, model = load_run(Path(args.run_dir))
    files = find_split_files(resolve_data(args.data or cfg.data))
    ids, unknown = vocab.encode(read_lines(files[args.split]))
    batch_size = args.batch_size
    if batch_size is None:  # not `or`: --batch-size 0 is a mistake, not the default
        batch_size = cfg.valid_batch_size if args.split == "valid" else cfg.test_batch_size
    if batch_size < 1:
        raise LstmlmError(f"--batch-size must be at least 1, got {batch_size}")
    loss, tokens = evaluate(model, batchify(ids, batch_size), cfg.bptt)
    result = {"split": args.split, "loss": loss, "ppl": perplexity(loss), "tokens": tokens,
              "unknown_words": unknown, "batch_size": batch_size, "data": str(files[args.split])}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.split}: loss {loss:.4f} | perplexity {perplexity(loss):.2f} | "
              f"{tokens:,} tokens (batch size {batch_size})")


def cmd_generate(args) -> None:
    from .api import load
    from .generate import check_sampling, sample

    check_sampling(args.max_tokens, args.temperature, args.top_k, args.top_p, args.num_samples)
    lm = load(args.run_dir)
    prompt_ids = lm.encode(args.prompt)
    steps = sample(lm.model, prompt_ids, args.max_tokens, args.temperature, args.top_k,
                   args.top_p, args.num_samples, args.seed)
    if args.num_samples == 1:  # stream each word as soon as it is sampled
        print(args.prompt.rstrip(), end="", flush=True)
        space = " "
        for ids in steps:
            word = lm.vocab.words[ids[0]]
            print("\n" if word == "<eos>" else space + word, end="", flush=True)
            space = "" if word == "<eos>" else " "  # no space at the start of a line
        print()
        return
    import torch
    from .generate import detokenize

    rows = torch.stack(list(steps), dim=1).tolist()
    for i, row in enumerate(rows):
        print(f"--- sample {i + 1} ---")
        print(args.prompt.rstrip() + " " + detokenize(lm.vocab.decode(row)))


def cmd_ablate(args) -> None:
    from .ablate import run_plan

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
        print(f"lstmlm: ablation interrupted during {status['interrupted']} (its checkpoint is "
              "saved); rerun the same command to continue", file=sys.stderr)


def cmd_report(args) -> None:
    from .report import report

    reference = Path(args.reference) if args.reference else None
    markdown, plotted = report([Path(d) for d in args.run_dirs], Path(args.out), reference)
    print(markdown, end="")
    if not plotted:
        print("lstmlm: tables written; for the plots, pip install matplotlib", file=sys.stderr)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lstmlm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("train", help="train a model into a run directory")
    p.add_argument("--preset", help="preset name (see `lstmlm presets`) or a .toml file; "
                                    "default lstm-baseline")
    p.add_argument("--out", help="run directory to create (default runs/PRESET)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="AWD-LSTM fine-tuning of a run, into a new run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", help="run directory to create (default RUN_DIR-finetune)")
    add_config_flags(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="perplexity of a trained model on a split")
    p.add_argument("run_dir")
    p.add_argument("--data", help="data directory or dataset name (default: the run's)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test")
    p.add_argument("--batch-size", type=int, help="default: the run's valid/test batch size")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="sample text from a trained model")
    p.add_argument("run_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, help="same seed, same text")
    p.add_argument("--num-samples", type=int, default=1, help="continuations, sampled as one batch")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "ablate", help="train every run of an ablation plan with one budget, then compare them",
        description="Train each run of PLAN into OUT/NAME with the same data, budget and seed, "
                    "then write OUT/results.csv, results.md, curves.png and ablation.png. Rerun "
                    "the same command after an interruption: finished runs are kept, an "
                    "interrupted one resumes. Config flags (--set KEY=VALUE, --hidden-size ...) "
                    "apply to every run.")
    p.add_argument("--plan", required=True,
                   help="seed (lstm-baseline, awd-1 ... awd-9), paper (awd-lstm and its "
                        "leave-one-out variants) or a plan .toml file")
    p.add_argument("--out", required=True, help="directory for the runs and the report")
    p.add_argument("--minutes-per-run", type=float, metavar="M",
                   help="training budget of each run in minutes (or --epochs N, --max-steps S; "
                        "without any, each preset's own epochs)")
    add_config_flags(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("report", help="compare run directories: table and plots",
                       description="Write results.csv, results.md, curves.png and ablation.png "
                                   "comparing the given run directories.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=".", help="where to write the report (default: here)")
    p.add_argument("--reference", metavar="RUN_DIR",
                   help="the run the others are compared with (default: the first)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    warnings.formatwarning = lambda message, *rest, **kw: f"lstmlm: warning: {message}\n"
    try:
        args.func(args)
    except LstmlmError as e:
        print(f"lstmlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lstmlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
