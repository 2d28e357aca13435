"""Compare runs: one table row per run directory (CSV and Markdown) and two plots.

    results.csv    every number, unrounded, for spreadsheets and scripts
    results.md     the same table rounded for reading, under a line naming corpus and budget
    curves.png     validation perplexity against training minutes and against epochs
    ablation.png   test perplexity of each run's best checkpoint, the reference bar highlighted

Rows come from what a run directory already holds (config.json, metrics.jsonl, results.json),
so any set of runs can be compared, finished or not. The plots need matplotlib (`lstmlm[plot]`);
without it the tables are still written.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from . import checkpoint as ckpt
from .config import Config
from .errors import LstmlmError
from .fileio import atomic_write

COLUMNS = ("name", "preset", "status", "stop_reason", "techniques", "parameters", "epochs",
           "steps", "train_minutes", "tokens_per_s", "best_valid_ppl", "test_ppl",
           "delta_test_ppl", "error")
PLAN_STATUS = "plan-status.json"  # written by `lstmlm ablate` beside its run directories
# What a report folder holds besides run directories (no run may take one of these names).
REPORT_FILES = ("results.csv", "results.md", "curves.png", "ablation.png", PLAN_STATUS)
UNLIMITED_EPOCHS = 1_000_000  # what `ablate` sets epochs to when another budget is the limit


def techniques(cfg: Config) -> list[str]:
    """The AWD-LSTM techniques a config turns on, in the paper's order."""
    on = [("weight drop", cfg.weight_drop > 0), ("NT-ASGD", cfg.ntasgd),
          ("variational dropout", cfg.variational_dropout),
          ("embedding dropout", cfg.dropout_embedding > 0), ("weight tying", cfg.tie_weights),
          ("variable BPTT", cfg.variable_bptt), ("AR/TAR", cfg.ar_alpha > 0 or cfg.tar_beta > 0),
          ("weight decay", cfg.weight_decay > 0)]
    return [name for name, enabled in on if enabled]


def status_of(results: dict | None) -> str:
    if results is None:
        return "incomplete"
    return "budget" if results.get("stop_reason") in ("max_steps", "max_minutes") else "finished"


def read_metrics(run_dir: Path) -> list[dict]:
    """The validations logged so far; a torn last line (a killed run) is skipped."""
    path = Path(run_dir) / ckpt.METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def read_results(run_dir: Path) -> dict | None:
    path = Path(run_dir) / ckpt.RESULTS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ckpt.RunDirError(f"{path}: damaged (not the JSON lstmlm writes)") from None


def _count_parameters(cfg: Config, vocab_size: int) -> int:
    """Parameters of a run that has no results.json yet, without allocating the model."""
    import torch

    from .model import LSTMLM, count_parameters

    with torch.device("meta"):
        return count_parameters(LSTMLM(cfg, vocab_size))


def _preset_from_plan(run_dir: Path) -> str:
    """The preset an `ablate` run came from, as recorded beside it; '' for other runs."""
    try:
        status = json.loads((Path(run_dir).parent / PLAN_STATUS).read_text(encoding="utf-8"))
        preset = next(r["preset"] for r in status["runs"] if r["name"] == Path(run_dir).name)
        return Path(preset).stem
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return ""


def empty_row(name: str, preset: str, cfg: Config | None) -> dict:
    """A row for a run with nothing on disk (not started, or failed before it began)."""
    row = {key: None for key in COLUMNS}
    row.update(name=name, preset=preset, cfg=cfg, curve=[], status="pending",
               techniques=techniques(cfg) if cfg else [])
    return row


def collect_row(run_dir: Path, name: str | None = None, preset: str | None = None) -> dict:
    """One table row from a run directory: results.json if the run finished, else its metrics."""
    run_dir = Path(run_dir)
    cfg, vocab_size = ckpt.read_run_config(run_dir)
    row = empty_row(name or run_dir.name,
                    preset if preset is not None else _preset_from_plan(run_dir), cfg)
    row["curve"] = curve = read_metrics(run_dir)
    results = read_results(run_dir)
    row["status"] = status_of(results)
    if results:
        row.update({k: results.get(k) for k in ("stop_reason", "parameters", "epochs", "steps",
                                                "train_minutes", "best_valid_ppl", "test_ppl")})
        row["tokens_per_s"] = results.get("train_tokens_per_s")
    else:
        row["parameters"] = _count_parameters(cfg, vocab_size)
        if curve:
            last = curve[-1]
            row.update(epochs=last.get("epoch"), steps=last.get("step"),
                       train_minutes=round(last.get("seconds", 0.0) / 60, 2),
                       tokens_per_s=last.get("tokens_per_s"),
                       best_valid_ppl=min(m["valid_ppl"] for m in curve))
    return row


def add_differences(rows: list[dict], reference: str) -> None:
    """delta_test_ppl: each row's test perplexity minus the reference row's (lower is better)."""
    ref = next((r["test_ppl"] for r in rows if r["name"] == reference), None)
    for r in rows:
        r["reference"] = r["name"] == reference
        r["delta_test_ppl"] = (r["test_ppl"] - ref if r["test_ppl"] is not None
                               and ref is not None else None)


# ---- the header: which corpus, which budget -------------------------------------------------

def _same(values: list):
    return values[0] if values and all(v == values[0] for v in values) else None


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def describe(rows: list[dict]) -> tuple[str, str]:
    """(corpus, budget) of a set of runs, for titles: 'wikitext-2', '30 min per run'."""
    cfgs = [r["cfg"] for r in rows if r["cfg"] is not None]
    corpora = sorted({Path(c.data.rstrip("/")).name or c.data for c in cfgs})
    corpus = ", ".join(corpora) or "unknown corpus"
    budget = _same([(c.max_minutes, c.max_steps, c.epochs) for c in cfgs])
    if budget is None:
        return corpus, "each run's own budget"
    minutes, steps, epochs = budget
    parts = ([f"{minutes:g} min"] if minutes else []) + ([_plural(steps, "step")] if steps else [])
    parts += [_plural(epochs, "epoch")] if epochs < UNLIMITED_EPOCHS else []
    seed = _same([c.seed for c in cfgs])
    text = " or ".join(parts) + " per run" if parts else "no limit"
    return corpus, text + (f", seed {seed}" if seed is not None else "")


# ---- tables ---------------------------------------------------------------------------------

def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "techniques": "; ".join(r["techniques"])})
    return buffer.getvalue()


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _params(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a `|` would end the cell."""
    return text.replace("|", "\\|")


def to_markdown(rows: list[dict], title: str) -> str:
    corpus, budget = describe(rows)
    ref = next((r["name"] for r in rows if r.get("reference")), None)
    lines = [f"# {title}", "",
             f"Corpus **{corpus}**, budget **{budget}**. Perplexities are those of each run's "
             f"best checkpoint; Δ is the test perplexity minus that of **{ref}** "
             "(lower is better).",
             "",
             "| run | preset | techniques | params | epochs | steps | minutes | tokens/s "
             "| best valid ppl | test ppl | Δ test ppl | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        delta = _fmt(r["delta_test_ppl"], "+.2f")
        if r.get("reference"):
            delta = ("0.00" if _finite(r["test_ppl"]) else "–") + " (ref)"
        status = r["status"] + (f" ({r['stop_reason']})" if r["status"] == "budget" else "")
        lines.append(" | ".join([
            f"| {_cell(r['name'])}", _cell(r["preset"] or "–"),
            ", ".join(r["techniques"]) or "none",
            _params(r["parameters"]), _fmt(r["epochs"], ".2f"), _fmt(r["steps"], ","),
            _fmt(r["train_minutes"], ".1f"), _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["best_valid_ppl"], ".2f"), _fmt(r["test_ppl"], ".2f"), delta,
            status + " |"]))
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- **{r['name']}**: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


# ---- plots ----------------------------------------------------------------------------------

def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write(path, buffer.getvalue())


def _label(name: str, width: int = 40) -> str:
    """A run's name for a plot: long ones (a path, when two runs share a folder name) keep
    their start and end, so the figure is not all legend."""
    return name if len(name) <= width else name[: width // 2 - 1] + "…" + name[-(width // 2):]


def plot_curves(rows: list[dict], path: Path, corpus: str, budget: str) -> None:
    from matplotlib.figure import Figure  # the object API renders with Agg: no display needed
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(13, 5), layout="constrained")
    by_time, by_epoch = fig.subplots(1, 2, sharey=True)
    for i, r in enumerate(rows):
        points = [m for m in r["curve"] if _finite(m.get("valid_ppl"))]
        if not points:
            continue
        style = dict(marker="o", markersize=3, linewidth=2.5 if r.get("reference") else 1.3,
                     linestyle=("-", "--", ":")[i // 10 % 3],  # 10 colours, then new dashes
                     label=_label(r["name"]) + (" (reference)" if r.get("reference") else ""))
        ppl = [m["valid_ppl"] for m in points]
        by_time.plot([m.get("seconds", 0.0) / 60 for m in points], ppl, **style)
        by_epoch.plot([m.get("epoch", 0.0) for m in points], ppl, **style)
    for ax, xlabel in ((by_time, "training time (minutes)"), (by_epoch, "epoch")):
        ax.set_yscale("log")  # plain numbers (23.5, 60, 100) rather than 2.35x10^1
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    by_time.set_ylabel("validation perplexity (log scale)")
    if by_time.lines:  # a column for every 25 runs, so that all of them fit the height
        fig.legend(*by_time.get_legend_handles_labels(), loc="outside right upper",
                   fontsize="small", ncols=math.ceil(len(by_time.lines) / 25))
    fig.suptitle(f"Validation perplexity: {corpus}, {budget}")
    _png(fig, path)


def plot_ablation(rows: list[dict], path: Path, corpus: str, budget: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.0 + 0.9 * len(rows)), 5.5), layout="constrained")
    ax = fig.subplots()
    x = range(len(rows))
    heights = [r["test_ppl"] if _finite(r["test_ppl"]) else 0.0 for r in rows]
    colors = ["tab:orange" if r.get("reference") else "tab:blue" for r in rows]
    bars = ax.bar(x, heights, color=colors)
    labels = [f"{r['test_ppl']:.1f}" if _finite(r["test_ppl"]) else
              "diverged" if r["test_ppl"] is not None else r["status"] for r in rows]
    ax.bar_label(bars, labels=labels, fontsize="small", padding=2)
    ref = next((r["test_ppl"] for r in rows if r.get("reference") and _finite(r["test_ppl"])),
               None)
    if ref:
        ax.axhline(ref, color="tab:orange", linestyle="--", linewidth=1, label="reference")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xticks(list(x), [_label(r["name"]) for r in rows], rotation=30, ha="right")
    ax.set_ylabel("test perplexity (best checkpoint)")
    ax.set_title(f"Test perplexity per run: {corpus}, {budget}")
    ax.margins(y=0.12)
    _png(fig, path)


# ---- everything at once ---------------------------------------------------------------------

def make_dir(out: Path) -> Path:
    """`out`, created if needed, or a one-line error that says why it cannot be."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LstmlmError(f"cannot create the folder {out} ({e.strerror}); choose another --out"
                          ) from None
    return out


def write_report(rows: list[dict], out: Path, reference: str, title: str,
                 plots: bool = True) -> bool:
    """Write results.csv, results.md and (with `plots`, if matplotlib is installed) the two
    plots into `out`. Returns False when matplotlib is missing."""
    out = make_dir(out)
    add_differences(rows, reference)
    atomic_write(out / "results.csv", to_csv(rows).encode("utf-8"))
    atomic_write(out / "results.md", to_markdown(rows, title).encode("utf-8"))
    if not plots:
        return True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    corpus, budget = describe(rows)
    plot_curves(rows, out / "curves.png", corpus, budget)
    plot_ablation(rows, out / "ablation.png", corpus, budget)
    return True


def report(run_dirs: list[Path], out: Path, reference: Path | None = None) -> tuple[str, bool]:
    """`lstmlm report`: compare run directories; the reference (default the first) is added
    if it is not among them. Returns the Markdown table and whether the plots were written."""
    unique: dict[Path, Path] = {}  # a run given twice is one row
    for d in map(Path, run_dirs):
        unique.setdefault(d.resolve(), d)
    run_dirs = list(unique.values())
    if reference is not None and Path(reference).resolve() not in unique:
        run_dirs.insert(0, Path(reference))
    ref_dir = Path(reference) if reference is not None else run_dirs[0]
    names = [d.resolve().name for d in run_dirs]
    rows = []
    for d, name in zip(run_dirs, names):
        rows.append(collect_row(d, name=str(d) if names.count(name) > 1 else name))
    ref_name = rows[[d.resolve() for d in run_dirs].index(ref_dir.resolve())]["name"]
    plotted = write_report(rows, out, ref_name, "Run comparison")
    return (Path(out) / "results.md").read_text(encoding="utf-8"), plotted
