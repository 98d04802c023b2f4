"""Results of a comparison, re-assembled from what its runs left on disk: results.json and results.md.

Per run: its ``metrics.jsonl`` (x2jax/train/metrics.py): the verification lines
(``split = "eval/<set>"``: ``accuracy``, ``accuracy_std`` over the 10 folds,
``val_at_far`` = TAR at FAR = 1e-3) and the last train line (``target_prob``,
``target_angle_deg``, ``nearest_angle_deg``, batch means); and
``final_angles.json`` when present. A run counts once its last step
(``total_steps``) has been verified.

Per loss and set: mean +- std (sample std, ddof=1) over seeds; against the first
loss, the paired difference over the seeds both have, with its two-sided 95 %
paired t interval (:mod:`x2jax.compare.stats`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from x2jax.compare import stats
from x2jax.compare.angles import ANGLES_FILE
from x2jax.compare.runs import Comparison, RunPlan

LEVEL = 0.95
TEST = ("paired t interval: for each seed s, d_s = (loss, s) - (reference, s), the two runs of seed s sharing "
        "initialisation and data order; mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n), n = seeds both finished")
METRICS = ("accuracy", "val_at_far")
TRAIN_METRICS = ("target_prob", "target_angle_deg", "nearest_angle_deg", "loss")


def read_metrics(workdir: Path) -> tuple[list[dict], dict[str, dict[int, dict]]]:
    """(train lines, ``{set: {step: eval line}}``) of a run's metrics.jsonl (missing file: nothing)."""
    path = Path(workdir) / "metrics.jsonl"
    train, evals = [], {}
    if not path.is_file():
        return train, evals
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        split = record.get("split", "")
        if split == "train":
            train.append(record)
        elif split.startswith("eval/"):
            evals.setdefault(split[len("eval/"):], {})[int(record["step"])] = record
    return train, evals


def _number(value: Any) -> float:
    return float(value) if value is not None else float("nan")  # "nan" strings too


def run_result(plan: RunPlan, total_steps: int) -> dict[str, Any]:
    """One run's figures: final verification per set, eval curve, last train metrics, final angles."""
    train, evals = read_metrics(plan.workdir)
    # the last step trained (train.py always logs it) and verified on every set
    finished = bool(train) and int(train[-1]["step"]) >= total_steps and \
        all(total_steps in by_step for by_step in evals.values())
    out: dict[str, Any] = {"loss": plan.loss.label, "seed": plan.seed, "workdir": str(plan.workdir),
                           "finished": finished, "sets": {}, "curves": {}}
    for name, by_step in sorted(evals.items()):
        steps = sorted(by_step)
        out["curves"][name] = {"step": steps, **{m: [_number(by_step[s].get(m)) for s in steps] for m in METRICS}}
        if total_steps in by_step:
            out["sets"][name] = {m: _number(by_step[total_steps].get(m)) for m in (*METRICS, "accuracy_std")}
    if train:
        last = train[-1]
        out["train"] = {"step": int(last["step"]), **{m: _number(last.get(m)) for m in TRAIN_METRICS}}
    angles = read_final_angles(plan)
    if angles is not None:  # summarised; the samples stay in the run's final_angles.json
        out["final_angles"] = {"step": angles["step"], "num_images": angles["num_images"],
                               **{f"{k}_{f.__name__}": float(f(angles[f"{k}_deg"]))
                                  for k in ("target", "nearest") for f in (np.mean, np.median)}}
    return out


def read_final_angles(plan: RunPlan) -> dict[str, Any] | None:
    """The run's ``final_angles.json`` (x2jax/compare/angles.py), or None."""
    path = plan.workdir / ANGLES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _clean(x: Any) -> Any:
    """NaN -> None for JSON."""
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def assemble(comparison: Comparison, total_steps: int) -> dict[str, Any]:
    """The results.json content: every run, then per loss the statistics over seeds."""
    runs = [run_result(plan, total_steps) for plan in comparison.runs]
    by_loss: dict[str, dict[int, dict]] = {}
    for r in runs:
        if r["finished"]:
            by_loss.setdefault(r["loss"], {})[r["seed"]] = r
    reference = comparison.losses[0].label
    sets = sorted({name for r in runs for name in r["sets"]})
    summary: dict[str, Any] = {}
    for choice in comparison.losses:
        done = by_loss.get(choice.label, {})
        entry: dict[str, Any] = {"name": choice.name, "params": choice.params, "seeds": sorted(done), "sets": {}}
        for name in sets:
            per_set: dict[str, Any] = {}
            for m in METRICS:
                values = [done[s]["sets"][name][m] for s in sorted(done) if name in done[s]["sets"]]
                if values:
                    per_set[m] = stats.summarize(values)
                ref = by_loss.get(reference, {})
                paired = [s for s in sorted(done) if s in ref and name in done[s]["sets"] and name in ref[s]["sets"]]
                if choice.label != reference and paired:
                    per_set[f"diff_{m}"] = stats.paired_t_interval(
                        [done[s]["sets"][name][m] for s in paired], [ref[s]["sets"][name][m] for s in paired],
                        level=LEVEL)
            entry["sets"][name] = per_set
        for m in TRAIN_METRICS:
            values = [done[s]["train"][m] for s in sorted(done) if "train" in done[s]]
            if values:
                entry[m] = stats.summarize(values)
        summary[choice.label] = entry
    return {"comparison": comparison.manifest(), "total_steps": total_steps, "reference": reference,
            "test": TEST, "level": LEVEL, "sets": sets, "losses": summary, "runs": runs}


def _pct(s: dict | None) -> str:
    if not s:
        return "-"
    std = "" if math.isnan(s["std"]) else f" +- {100 * s['std']:.2f}"
    return f"{100 * s['mean']:.2f}{std}"


def _diff(d: dict | None) -> str:
    if not d:
        return "-"
    if math.isnan(d["low"]):
        return f"{100 * d['mean']:+.2f} (n={d['n']}: no interval)"
    return f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"


def _plain(s: dict | None, fmt: str) -> str:
    if not s:
        return "-"
    std = "" if math.isnan(s["std"]) else f" +- {format(s['std'], fmt)}"
    return f"{format(s['mean'], fmt)}{std}"


def to_markdown(results: dict[str, Any]) -> str:
    """results.md: a verification table per set, the train-end table, the runs that are missing."""
    ref = results["reference"]
    lines = ["# Loss comparison", ""]
    manifest = results["comparison"]
    lines += [f"Losses {', '.join(results['losses'])}; seeds {manifest['seeds']} (initialisation and step rng); "
              f"data order from seed {manifest['data_seed']} for every run; {results['total_steps']} steps. "
              f"Verification at the last step (insightface's 10-fold protocol).", ""]
    lines += [f"Mean +- std over seeds (sample std). Delta: against **{ref}**, {results['test']}; "
              f"{int(100 * results['level'])} % interval in brackets, in percentage points.", ""]
    for name in results["sets"]:
        lines += [f"## {name}", "",
                  f"| loss | seeds | accuracy (%) | delta accuracy vs {ref} | TAR@FAR=1e-3 (%) | delta TAR vs {ref} |",
                  "|---|---|---|---|---|---|"]
        for label, entry in results["losses"].items():
            s = entry["sets"].get(name, {})
            lines.append(f"| {label} | {len(entry['seeds'])} | {_pct(s.get('accuracy'))} | "
                         f"{_diff(s.get('diff_accuracy'))} | {_pct(s.get('val_at_far'))} | "
                         f"{_diff(s.get('diff_val_at_far'))} |")
        lines.append("")
    lines += ["## At the end of training", "",
              "Last logged train step, batch means (mean +- std over seeds): p_y under the loss's own logits, "
              "angle to the class centre, angle to the nearest other centre.", "",
              "| loss | target_prob | target angle (deg) | nearest angle (deg) | loss |", "|---|---|---|---|---|"]
    for label, entry in results["losses"].items():
        lines.append(f"| {label} | {_plain(entry.get('target_prob'), '.3g')} | "
                     f"{_plain(entry.get('target_angle_deg'), '.2f')} | {_plain(entry.get('nearest_angle_deg'), '.2f')}"
                     f" | {_plain(entry.get('loss'), '.4g')} |")
    missing = [f"{r['loss']} seed {r['seed']}" for r in results["runs"] if not r["finished"]]
    lines += ["", f"Unfinished runs (left out): {', '.join(missing)}." if missing else "Every run finished.", ""]
    return "\n".join(lines)


def write_results(comparison: Comparison, total_steps: int) -> dict[str, Any]:
    """Writes ``results.json`` and ``results.md`` under the comparison directory.

    Args:
      comparison: the comparison (its runs' directories are read).
      total_steps: the run length; a run counts once this step is trained and verified.

    Returns:
      The results (:func:`assemble`), NaN kept (results.json has them as null).
    """
    results = assemble(comparison, total_steps)
    directory = comparison.workdir
    (directory / "results.json").write_text(json.dumps(_clean(results), indent=1) + "\n")
    (directory / "results.md").write_text(to_markdown(results))
    return results
