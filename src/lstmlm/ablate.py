"""`lstmlm ablate`: train every run of a plan with the same data, budget and seed, then compare.

A plan is a TOML file: an optional `reference` (a run name; default the first run) and one
`[[run]]` table per run with a `preset` (a name or a .toml path, relative to the plan file),
an optional `name` (default the preset's) and optional `set = {key = value}` overrides:

    reference = "lstm-baseline"
    [[run]]
    preset = "lstm-baseline"
    [[run]]
    preset = "awd-1-weight-drop"
    set = {hidden_size = 650}

Each run is an ordinary run directory OUT/NAME, so the command can simply be rerun after a
Ctrl-C or a crash: finished runs (results.json) are skipped, interrupted ones resumed from their
last checkpoint (or started again if they had none), the rest started; a directory holding a
run with other settings or another budget than the plan's (another --set, say) is refused
rather than mixed in. Every run's settings, shared options included, are checked before the
first run starts. A run that fails is recorded in OUT/plan-status.json and the plan goes on.
The tables (see report.py) are rewritten after every run, the plots at the end.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from . import checkpoint as ckpt
from .config import Config, ConfigError, did_you_mean, load_preset, packaged_tomls, read_toml
from .data import load_corpus
from .datasets import recorded_data, resolve_data
from .errors import LstmlmError
from .report import (PLAN_STATUS, REPORT_FILES, UNLIMITED_EPOCHS, collect_row, empty_row,
                     make_dir, read_results, status_of, write_report)
from .train import RESUMABLE_OVERRIDES, run_training

BUDGET = ("max_minutes", "max_steps", "epochs")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a run name is a plain directory name


class PlanError(LstmlmError):
    """A plan file that is missing, not TOML, empty, or names an unknown preset."""


@dataclass
class PlanRun:
    name: str
    preset: str  # a preset name, or the path of a preset .toml file
    overrides: dict


def load_plan(spec: str) -> tuple[list[PlanRun], str]:
    """The runs and the reference run's name of a shipped plan (`seed`, `paper`) or a plan file.
    Every preset and override is checked here, so a typo fails before anything trains."""
    files = packaged_tomls("plans")
    if spec in files:
        path, folder = files[spec], None
    elif spec.endswith(".toml"):
        path = Path(spec)
        if not path.is_file():
            raise PlanError(f"plan file {spec}: not found")
        folder = path.parent
    else:
        raise PlanError(f"unknown plan {spec!r}: {did_you_mean(spec, files)}shipped plans are "
                        f"{', '.join(sorted(files))}, or pass a .toml file")
    data = read_toml(path, f"plan {spec}", PlanError)

    def fail(message: str) -> NoReturn:
        raise PlanError(f"plan {spec}: {message}")

    unknown = sorted(set(data) - {"description", "reference", "run"})
    if unknown:
        fail(f"unknown key {unknown[0]!r} (a plan has reference and [[run]] tables)")
    tables = data.get("run", [])
    if not isinstance(tables, list) or not tables:
        fail('no runs; add [[run]] tables, each with preset = "..."')
    runs: list[PlanRun] = []
    for i, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            fail(f"run {i}: expected a [[run]] table")
        unknown = sorted(set(table) - {"preset", "name", "set"})
        if unknown:
            fail(f"run {i}: unknown key {unknown[0]!r} (expected preset, name, set)")
        preset, overrides = table.get("preset"), table.get("set", {})
        if not isinstance(preset, str) or not preset:
            fail(f'run {i}: needs preset = "NAME" or a .toml path')
        if not isinstance(overrides, dict):
            fail(f"run {i}: set must be a table, e.g. set = {{hidden_size = 650}}")
        if preset.endswith(".toml") and folder and (folder / preset).is_file():
            preset = str(folder / preset)  # preset files are found beside the plan
        try:  # keys and types; the settings together are checked with the shared options
            load_preset(preset).update(overrides, source=f"run {i} set", validate=False)
        except ConfigError as e:
            fail(f"run {i}: {e}")
        name = table.get("name", Path(preset).stem)
        if not isinstance(name, str) or not NAME.fullmatch(name):
            fail(f"run {i}: name {name!r} must be a plain directory name (letters, digits, ._+-)")
        if name in REPORT_FILES:
            fail(f"run {i}: name {name!r} is taken by the report; give the run another name")
        if name in [r.name for r in runs]:
            fail(f"two runs are named {name!r}; give one of them name = \"...\"")
        runs.append(PlanRun(name, preset, overrides))
    reference = data.get("reference", runs[0].name)
    if reference not in [r.name for r in runs]:
        fail(f"reference {reference!r} is not one of the runs ({', '.join(r.name for r in runs)})")
    return runs, reference


def common_overrides(overrides: dict) -> dict:
    """What every run shares. A budget given for one limit lifts the presets' others (their
    epochs, say), so all runs stop at the same limit; the seed defaults to Config's."""
    common = {"seed": Config().seed, **overrides}
    if any(key in overrides for key in BUDGET):
        common = {"max_minutes": 0.0, "max_steps": 0, "epochs": UNLIMITED_EPOCHS, **common}
        limits = (common["max_minutes"], common["max_steps"], common["epochs"] < UNLIMITED_EPOCHS)
        if not any(limits):
            raise ConfigError("a budget of 0 means no limit: give --minutes-per-run, --epochs "
                              "or --max-steps above 0")
    return common


def run_config(run: PlanRun, overrides: dict) -> Config:
    """The run's preset, then its plan overrides, then those every run shares."""
    cfg = load_preset(run.preset)
    try:
        cfg.update({**run.overrides, **overrides}, source=f"run {run.name}")
    except ConfigError as e:
        raise ConfigError(f"run {run.name}: {e}") from None
    cfg.data = recorded_data(cfg.data)  # as the run directory records them
    cfg.init_from = ckpt.recorded_run(cfg.init_from)
    return cfg


def check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse a directory that holds a run with other settings than `cfg`, another budget,
    stop_patience or --data included: it would be compared with the others as if it were the
    plan's run."""
    if not (run_dir / ckpt.CONFIG).is_file():
        return
    saved, _ = ckpt.read_run_config(run_dir)
    changed = sorted(k for k, v in cfg.to_dict().items() if getattr(saved, k) != v
                     and (k in BUDGET + ("stop_patience", "data")
                          or k not in RESUMABLE_OVERRIDES))
    if changed:
        saved_nothing = not any((run_dir / f).is_file() for f in (ckpt.STATE, ckpt.WEIGHTS))
        advice = (f"it saved nothing yet: remove {run_dir} to start it with these settings"
                  if saved_nothing else "rerun with the options it was started with, or use "
                  "another --out")
        raise ckpt.RunDirError(
            f"{run_dir} holds a run with other settings ({', '.join(changed)}); {advice}")


def _train_one(run_dir: Path, cfg: Config, quiet: bool) -> dict:
    """Start, resume or skip one run; its results, or {"stop_reason": "interrupted"}."""
    if not (run_dir / ckpt.CONFIG).is_file():
        return run_training(cfg, out=run_dir, quiet=quiet)
    results = read_results(run_dir)
    if results is not None:
        return results
    # Resumes from the last checkpoint, or trains from the start if there was none yet.
    return run_training(resume=run_dir, overrides=cfg.to_dict(), quiet=quiet)


def _write_status(out: Path, plan: str, reference: str, overrides: dict, status: list) -> None:
    ckpt.write_json(out / PLAN_STATUS, {"plan": plan, "reference": reference,
                                        "overrides": overrides, "runs": status})


def _rows(runs: list[PlanRun], configs: list[Config], status: list[dict], out: Path
          ) -> list[dict]:
    rows = []
    for run, cfg, entry in zip(runs, configs, status):
        run_dir, preset = out / run.name, Path(run.preset).stem
        if (run_dir / ckpt.CONFIG).is_file():
            row = collect_row(run_dir, name=run.name, preset=preset)
        else:
            row = empty_row(run.name, preset, cfg)
        if entry["status"] in ("failed", "interrupted"):
            row.update(status=entry["status"], error=entry["error"])
        rows.append(row)
    return rows


def run_plan(plan: str, out: Path, overrides: dict | None = None, quiet: bool = False) -> dict:
    """Run (or continue) every run of `plan` in OUT/NAME, rewriting the report in OUT after each.

    Returns {"runs": [status of each run], "interrupted": run name or None, "plots": bool};
    the statuses are also in OUT/plan-status.json.
    """
    runs, reference = load_plan(plan)
    # Every run's settings, shared options and data included, fail here, before any training.
    overrides = common_overrides(overrides or {})
    configs = [run_config(run, overrides) for run in runs]
    for data, min_count, max_vocab in sorted({(c.data, c.min_count, c.max_vocab)
                                              for c in configs}):
        load_corpus(resolve_data(data), min_count, max_vocab)  # cached for the runs
    out = Path(out)
    for run, cfg in zip(runs, configs):
        check_run_dir(out / run.name, cfg)
    make_dir(out)
    with ckpt.locked(out):  # two ablations in one folder would train the same runs at once
        status = [{"name": r.name, "preset": r.preset, "status": "pending", "stop_reason": None,
                   "error": None} for r in runs]
        plotted = True
        for i, (run, cfg, entry) in enumerate(zip(runs, configs, status), 1):
            run_dir, tag = out / run.name, f"[{i}/{len(runs)}] {run.name}"
            if (run_dir / ckpt.RESULTS).is_file():
                _log(quiet, f"{tag}: finished earlier, skipped")
            else:
                resuming = (run_dir / ckpt.STATE).is_file()
                _log(quiet, f"{tag}: {'resuming' if resuming else 'starting'} in {run_dir}")
            entry["status"] = "running"
            _write_status(out, plan, reference, overrides, status)
            try:
                results = _train_one(run_dir, cfg, quiet)
                reason = results["stop_reason"]
                entry.update(stop_reason=reason, status="interrupted"
                             if reason == "interrupted" else status_of(results))
            except (LstmlmError, RuntimeError, FloatingPointError) as e:  # the plan goes on
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                entry.update(status="failed", error=message)
                _log(quiet, f"{tag} failed: {message}")
            except KeyboardInterrupt:  # a second Ctrl-C, or one outside training: checkpoints hold
                entry.update(status="interrupted", stop_reason="interrupted")
                _write_status(out, plan, reference, overrides, status)
                return {"runs": status, "interrupted": run.name, "plots": plotted}
            _write_status(out, plan, reference, overrides, status)
            # Plots take a second: only at the end.
            last = i == len(runs) or entry["status"] == "interrupted"
            plotted = write_report(_rows(runs, configs, status, out), out, reference,
                                   f"Ablation: {Path(plan).stem}", plots=last)
            if entry["status"] == "interrupted":
                return {"runs": status, "interrupted": run.name, "plots": plotted}
        return {"runs": status, "interrupted": None, "plots": plotted}


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"lstmlm ablate: {message}", file=sys.stderr, flush=True)
