"""`ahm bench compare`: the downstream comparison grid (policy x backbone x seed) under one budget.

Each cell pretrains (unless `scratch`), fine-tunes with a fraction of the labels, and evaluates on the held-out
split. Cells are directories; a finished cell holds `cell.json` and is never rerun, so the grid is resumable.
Pretraining runs are shared between cells that differ only in what is downstream of them.

Scores follow `ahm.eval.metrics` (empty-in-both cases excluded by default; dataset-level Dice beside the per-case
mean). A finished cell scored under another empty-case convention, or before dataset-level Dice existed, is
re-evaluated from its kept checkpoint (no retraining) when the grid is gathered.

On volumes (`data.spatial_dims: 3` in both sections, or `spatial_dims=3`) every cell pretrains and fine-tunes in
3D and is scored per volume by sliding windows, HD95 in mm; the floors are fitted and scored on the same volumes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ahm.config import FinetuneConfig, PretrainConfig, build_config
from ahm.errors import AhmError
from ahm.io import write_bytes, write_json, write_text
from ahm.masking.base import policy_names

COLUMNS = ["backbone", "policy", "seed", "labels_fraction", "dice", "dataset_dice", "iou", "hd95", "hd95_unit", "val_dice",
           "selection", "empty_cases", "pretrain_final_loss", "hardness_ratio", "critic_spearman", "pretrain_s",
           "finetune_s"]
# The figure of each fine-tuning run's checkpoint choice, for cells from before `select_by` existed.
OLD_SELECTION = "validation per-case mean Dice, empty-in-both = 1 (before select_by)"
MAX_SIGN_FLIP = 40  # seeds the exact paired test can count (2 x 2^20 sums)

SETTINGS = "grid.json"  # the settings every cell of a grid folder was run with
# each setting as the option that sets it, for the one line that refuses a grid resumed with others
_OPTION = {"pretrain_steps": "--pretrain-steps", "pretrain_epochs": "--pretrain-epochs",
           "finetune_steps": "--finetune-steps", "finetune_epochs": "--finetune-epochs", "split": "--split",
           "config": "--config (its contents)", "protocols": "--protocol"}


def _unset(value: Any) -> Any:
    return "(unset)" if value is None else value


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse, in one line and before any work, a grid folder whose cells were run with other settings (a finished
    cell is kept, so a resume with another budget or config would mix two grids in one table); record them in a
    new (or older, unrecorded) grid folder."""
    path = out / SETTINGS
    settings = json.loads(json.dumps(settings))  # as it reads back: tuples as lists
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise AhmError(f"{path}: not readable ({err}); it records the grid's settings") from None
        for key, value in settings.items():
            if key in saved and saved[key] != value:
                shown = "" if key == "config" else f" {_unset(saved[key])}, not {_unset(value)}"
                raise AhmError(f"--out {out}: its cells were run with another {_OPTION.get(key, key)}{shown} "
                               f"({path}); give another --out, or this grid's own settings")
        if all(key in saved for key in settings):
            return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def _check_names(policies: list[str], backbones: list[str]) -> None:
    allowed = ["scratch"] + policy_names()
    for p in policies:
        if p not in allowed:
            raise AhmError(f"--policies: unknown policy {p!r}; choose from {', '.join(allowed)}")
    from ahm.models.backbones import backbone_names

    for b in backbones:
        if b not in backbone_names():
            raise AhmError(f"--backbones: unknown backbone {b!r}; choose from {', '.join(backbone_names())}")


def check_grid(policies: list[str], backbones: list[str], seeds: int, first_seed: int) -> None:
    """The options every grid (`bench compare`, `bench curve`) refuses in one line before any work."""
    _check_names(policies, backbones)
    if seeds < 1:
        raise AhmError("--seeds must be at least 1")
    if first_seed < 0:
        raise AhmError("--first-seed must be at least 0")


def with_spatial_dims(overrides: dict[str, Any], spatial_dims: int | None) -> dict[str, Any]:
    """`overrides` (with `pretrain:` and `finetune:` sections) with `data.spatial_dims` set in both, when given:
    a grid's pretraining and fine-tuning must agree on the dimension."""
    if spatial_dims is None:
        return overrides
    if spatial_dims not in (2, 3):
        raise AhmError(f"--spatial-dims {spatial_dims}: give 2 (images) or 3 (volumes)")
    out = dict(overrides)
    for section in ("pretrain", "finetune"):
        out[section] = _merge(overrides.get(section) or {}, {"data": {"spatial_dims": spatial_dims}})
    return out


def check_same_dims(overrides: dict[str, Any]) -> None:
    """Refuse a grid whose `pretrain:` and `finetune:` sections name different `data.spatial_dims`."""
    dims = {s: int(((overrides.get(s) or {}).get("data") or {}).get("spatial_dims", 2)) for s in ("pretrain", "finetune")}
    if dims["pretrain"] != dims["finetune"]:
        raise AhmError(f"--config: pretrain: data.spatial_dims is {dims['pretrain']} but finetune: data.spatial_dims "
                       f"is {dims['finetune']}; a grid pretrains and fine-tunes in one dimension")


def run_compare(data: str | Path, out: str | Path, policies: list[str], backbones: list[str], seeds: int,
                labels_fraction: float, pretrain_steps: int, finetune_epochs: int,
                base_config: str | Path | None = None, overrides: dict[str, Any] | None = None,
                split: str = "test", log: Callable[[str], None] | None = None,
                finetune_steps: int | None = None, first_seed: int = 0,
                empty: str = "exclude", spatial_dims: int | None = None) -> dict[str, Any]:
    """Run every unfinished cell of the grid; write results.csv, results.md and results.png; return the table.
    `spatial_dims` (2 or 3), when given, sets `data.spatial_dims` of both sections of `overrides`.

    Seeds are `first_seed .. first_seed + seeds - 1`: two processes (or machines) can share one grid directory
    with disjoint seed ranges, and a last call over all seeds then only gathers the finished cells."""
    from ahm.eval.evaluate import evaluate
    from ahm.eval.metrics import check_empty
    from ahm.models.backbones import get_backbone

    check_empty(empty)
    check_grid(policies, backbones, seeds, first_seed)
    out = Path(out)
    overrides = with_spatial_dims(overrides or {}, spatial_dims)
    check_same_dims(overrides)
    # the labels fraction names each cell, and --empty-cases re-scores finished cells: neither mixes two grids
    check_settings(out, {"pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps,
                         "finetune_epochs": None if finetune_steps else finetune_epochs, "split": split,
                         "config": {"file": None, "overrides": overrides}})
    say = log or (lambda msg: None)
    rows: list[dict[str, Any]] = []
    cells = [(b, p, s) for b in backbones for p in policies for s in range(first_seed, first_seed + seeds)]
    for n, (backbone, policy, seed) in enumerate(cells, 1):
        cell_dir = out / "cells" / f"{backbone}-{policy}-seed{seed}-labels{labels_fraction:g}"
        done = cell_dir / "cell.json"
        if done.is_file():
            row = json.loads(done.read_text())
            if row.get("empty_cases") != empty or "dataset_dice" not in row:
                row.update(_scores(evaluate(cell_dir / "finetune", data, split=split, progress=False, empty=empty)))
                row.setdefault("selection", OLD_SELECTION)
                write_json(done, row)
                say(f"[{n}/{len(cells)}] {cell_dir.name}: done earlier, re-scored ({empty} empty cases)")
            else:
                say(f"[{n}/{len(cells)}] {cell_dir.name}: done earlier, kept")
            rows.append(row)
            continue
        say(f"[{n}/{len(cells)}] {cell_dir.name}")
        row: dict[str, Any] = {"backbone": backbone, "policy": policy, "seed": seed, "labels_fraction": labels_fraction}
        init = None
        if policy != "scratch":
            pre_dir = out / "pretrain" / f"{backbone}-{policy}-seed{seed}"
            pre_cfg = build_config(PretrainConfig, file=base_config, overrides=_merge(overrides.get("pretrain", {}), {
                "data": {"path": str(data)}, "model": {"backbone": backbone},
                "masking": {"policy": policy}, "train": {"steps": pretrain_steps, "seed": seed},
            }), nulls=True)
            summary, row["pretrain_s"] = pretrain_cell(pre_cfg, pre_dir)
            row.update(pretrain_figures(summary))
            init = str(pre_dir)
        ft_cfg = build_config(FinetuneConfig, overrides=_merge(overrides.get("finetune", {}), {
            "data": {"path": str(data)}, "model": {"backbone": backbone},
            "segmenter": get_backbone(backbone).segmenter, "init": init, "labels_fraction": labels_fraction,
            "train": ({"epochs": None, "steps": finetune_steps} if finetune_steps else {"epochs": finetune_epochs})
            | {"seed": seed},
        }), nulls=True)
        row.update(finetune_cell(ft_cfg, cell_dir / "finetune", data, split, empty))
        write_json(done, row)
        rows.append(row)
    table = aggregate(rows)
    paired = paired_differences(rows)
    # The floor every cell should clear: intensity alone, fitted on the same labelled subsets.
    from ahm.bench.baseline import run_baseline

    data_cfg = build_config(FinetuneConfig, overrides=_merge(overrides.get("finetune", {}),
                                                             {"data": {"path": str(data)}}), nulls=True).data
    baseline = run_baseline(data, labels_fraction, seeds, first_seed, split=split, data_cfg=data_cfg, empty=empty)
    write_json(out / "baseline.json", baseline)
    write_results(out, rows, table, split, baseline, paired)
    return {"rows": rows, "table": table, "baseline": baseline, "paired": paired}


def pretrain_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """What a grid row keeps of a pretraining run's summary: its steps and final loss and, for the AHM policies, the
    hardness ratio of the masked patches and the critic's rank correlation with the true error (else None)."""
    return {"pretrain_steps": summary.get("steps"), "pretrain_final_loss": summary.get("final_loss"),
            "hardness_ratio": summary.get("hardness_ratio"),
            "critic_spearman": summary.get("critic_spearman"),
            **({"pretrain_recorded_final_loss": summary["recorded_final_loss"]} if "recorded_final_loss" in summary
               else {})}


def pretrain_cell(cfg: PretrainConfig, run_dir: Path) -> tuple[dict[str, Any], float]:
    """A grid's pretraining run: its summary if it finished earlier, else run (or resume) it; and the seconds.

    A finished run is its summary *and* its encoder. A summary alone is a record whose weights are gone (a grid
    folder rebuilt from kept records, which hold summaries, not weights): the cells still to run need the encoder,
    so the run is made again, and its summary carries `recorded_final_loss`, the recorded run's final loss, so that
    the cell says its pretraining is a rerun and by how much the rerun differs (a rerun cut before it finished
    resumes as an ordinary run, without that figure)."""
    from ahm.train.pretrain import pretrain

    t0 = time.perf_counter()
    summary_path = run_dir / "summary.json"
    recorded = None
    if summary_path.is_file():
        recorded = json.loads(summary_path.read_text())
        if (run_dir / "encoder.safetensors").is_file():
            return recorded, time.perf_counter() - t0
        if not (run_dir / "run.json").is_file() and [p.name for p in run_dir.iterdir()] == ["summary.json"]:
            summary_path.unlink()  # the record alone (the repository keeps it): start the run afresh here
    resume = recorded is None and (run_dir / "checkpoints" / "last.ckpt").is_file()
    summary = pretrain(cfg, run_dir, resume=resume, force=not resume and run_dir.exists(), progress=False)
    if recorded is not None:
        summary = {**summary, "recorded_final_loss": recorded.get("final_loss")}
    return summary, time.perf_counter() - t0


def finetune_cell(cfg: FinetuneConfig, run_dir: Path, data: str | Path, split: str,
                  empty: str = "exclude") -> dict[str, Any]:
    """A grid's fine-tuning run (resumed if it was cut) and its evaluation: what a cell row keeps of them."""
    from ahm.eval.evaluate import evaluate
    from ahm.train.finetune import finetune

    t0 = time.perf_counter()
    resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
    summary = finetune(cfg, run_dir, resume=resume, force=not resume and run_dir.exists(), progress=False)
    row = {"finetune_s": time.perf_counter() - t0, "val_dice": summary.get("best_val_dice"),
           "selection": summary.get("selection_metric", OLD_SELECTION)}
    row.update(_scores(evaluate(run_dir, data, split=split, progress=False, empty=empty)))
    return row


def _scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a cell keeps of `evaluate`'s metrics: the primary level's figures and how they were computed."""
    return {"dice": metrics["dice"], "dataset_dice": metrics.get("dataset_dice"), "iou": metrics["iou"],
            "hd95": metrics["hd95"], "hd95_unit": metrics.get("hd95_unit"), "empty_cases": metrics.get("empty_cases"),
            "level": metrics.get("level")}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def hd95_values(group: list[dict[str, Any]]) -> list[Any]:
    """The HD95 figures of one table entry's cells, or none when they were scored in different units (a grid
    resumed across a change of unit, e.g. cells of a NIfTI-sliced set scored in pixels before HD95 was in mm):
    a mean of millimetres and pixels is no figure."""
    units = {r.get("hd95_unit") for r in group if r.get("hd95") is not None}
    return [r.get("hd95") for r in group] if len(units) <= 1 else []


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds, per backbone and policy."""
    keys: list[tuple[str, str]] = []
    for r in rows:
        if (r["backbone"], r["policy"]) not in keys:
            keys.append((r["backbone"], r["policy"]))
    table = []
    for backbone, policy in keys:
        group = [r for r in rows if r["backbone"] == backbone and r["policy"] == policy]
        entry: dict[str, Any] = {"backbone": backbone, "policy": policy, "n": len(group)}
        for metric in ("dice", "dataset_dice", "iou", "hd95", "val_dice"):
            values = hd95_values(group) if metric == "hd95" else [r.get(metric) for r in group]
            entry[metric], entry[metric + "_std"] = _mean_std(values)
        table.append(entry)
    return table


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided p-value of the exact paired sign-flip (permutation) test that the mean difference is zero:
    the share of the 2^n sign assignments whose |mean| is at least the observed one. No normality assumed;
    with n pairs the smallest possible value is 2 / 2^n (0.25 for 3 seeds, 0.0078 for 8).

    Counted exactly by meeting in the middle: the 2^(n/2) signed sums of each half, one half sorted and searched
    for each sum of the other, so 40 seeds take about a second."""
    n = len(diffs)
    if n == 0:
        return float("nan")
    if n > MAX_SIGN_FLIP:
        raise AhmError(f"the exact sign-flip test counts 2^n sign patterns; {n} pairs is more than "
                       f"{MAX_SIGN_FLIP}")
    d = np.asarray(diffs, dtype=np.float64)
    observed = abs(float(d.sum())) - 1e-12
    if observed <= 0:
        return 1.0  # a zero mean: every sign pattern is at least as far from zero

    def signed_sums(values: np.ndarray) -> np.ndarray:
        sums = np.zeros(1)
        for v in values:
            sums = np.concatenate([sums + v, sums - v])
        return sums

    left, right = signed_sums(d[: n // 2]), np.sort(signed_sums(d[n // 2:]))
    at_least = len(right) - np.searchsorted(right, observed - left, side="left")  # left + right >= observed
    at_most = np.searchsorted(right, -observed - left, side="right")  # left + right <= -observed
    return float(at_least.sum() + at_most.sum()) / float(2 ** n)


def paired_differences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per backbone, every pretraining policy minus `scratch` and every other policy minus `random`, paired by
    seed (a seed fixes the labelled subset): mean and sample std of the differences, how many seeds the policy
    was ahead on, and the exact sign-flip p-value; for the reported split's Dice and the validation Dice."""
    by_cell = {(r["backbone"], r["policy"], r["seed"]): r for r in rows}
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    pairs = [(p, "scratch") for p in policies if p != "scratch"]
    pairs += [(p, "random") for p in policies if p not in ("scratch", "random")]
    out = []
    for backbone in backbones:
        for policy, reference in pairs:
            seeds = sorted(s for (b, p, s) in by_cell if b == backbone and p == policy
                           and (backbone, reference, s) in by_cell)
            if not seeds:
                continue
            pairs_by_seed = [(by_cell[(backbone, policy, s)], by_cell[(backbone, reference, s)]) for s in seeds]
            out.append({"backbone": backbone, "policy": policy, "reference": reference, **paired_entry(pairs_by_seed)})
    return out


def paired_entry(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """(arm, reference) cell rows of the same seeds: `n`, and per metric (the reported split's Dice, the
    validation Dice) the mean and sample std of arm minus reference, seeds ahead, and the exact sign-flip p."""
    entry: dict[str, Any] = {"n": len(pairs)}
    for metric in ("dice", "val_dice"):
        d = [a.get(metric) - b.get(metric) for a, b in pairs if a.get(metric) is not None and b.get(metric) is not None]
        entry.update(paired_stats(metric, d))
    return entry


def paired_stats(metric: str, values: list[float]) -> dict[str, Any]:
    """Per-seed paired figures (differences, or slopes) of one metric: `metric` and `metric_std` (mean and sample
    std), `metric_ahead` (how many are positive), `metric_n` (how many there are) and `metric_p` (the exact
    sign-flip p that their mean is zero)."""
    mean, std = _mean_std(values)
    return {metric: mean, metric + "_std": std, metric + "_ahead": sum(v > 0 for v in values),
            metric + "_n": len(values), metric + "_p": sign_flip_p(values)}


def floors(baseline: dict[str, Any] | None) -> dict[str, dict[str, float | None]]:
    """The floors every policy must beat, by name: mean test Dice and dataset Dice of each."""
    if baseline is None:
        return {}
    out = {"intensity lookup": {k: (baseline["summary"].get(k) or {}).get("mean") for k in ("dice", "dataset_dice")}}
    if baseline.get("empty_prediction"):
        out["predict nothing"] = {k: baseline["empty_prediction"].get(k) for k in ("dice", "dataset_dice")}
    return out


MIN_MARGIN = 0.01  # Dice a policy must clear a floor by, at least, to count as above it


def below_floors(entry: dict[str, Any], floor: dict[str, dict[str, float | None]]) -> list[str]:
    """The floors a table entry is not clearly above, on either Dice figure (per case, dataset-level): clearly
    means by more than MIN_MARGIN and by more than two standard errors of the entry's mean over seeds (a
    network at 0.001 Dice does not beat predicting nothing at 0)."""
    failed = []
    n = max(int(entry.get("n") or 1), 1)
    for name, values in floor.items():
        for key in ("dice", "dataset_dice"):
            mine, theirs = entry.get(key), values.get(key)
            if theirs is None or mine is None or (isinstance(mine, float) and math.isnan(mine)):
                continue
            std = entry.get(f"{key}_std") or 0.0
            margin = max(MIN_MARGIN, 2 * (std if math.isfinite(std) else 0.0) / math.sqrt(n))
            if not mine - theirs > margin:
                failed.append(name)
                break
    return failed


def _f(value: Any, digits: int = 4, sign: str = "") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{sign}.{digits}f}"


def write_results(out: Path, rows: list[dict[str, Any]], table: list[dict[str, Any]], split: str,
                  baseline: dict[str, Any] | None = None, paired: list[dict[str, Any]] | None = None) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in COLUMNS})
    write_text(out / "results.csv", buf.getvalue())
    conventions = sorted({str(r.get("empty_cases")) for r in rows})
    old = "one" in conventions
    floor = floors(baseline)
    units = sorted({str(r["hd95_unit"]) for r in rows if r.get("hd95_unit")})
    hd95 = f"HD95 ({split}, mm)" if units == ["mm"] else f"HD95 ({split})"
    lines = [
        f"Mean +- sample std over seeds; metrics on the `{split}` split (never used for choices). Dice: mean over "
        "cases (volumes where the images are slices of volumes), "
        + ("**OLD CONVENTION: a class absent from prediction and ground truth scores 1**" if old
           else "cases where a class is absent from prediction and ground truth left out")
        + "; dataset Dice: pooled over the split. val Dice is each fine-tuning run's model-selection figure "
        f"({'; '.join(sorted({str(r.get('selection')) for r in rows}))})."
        + (f" HD95 in {'; '.join(units)}." if units else "")
             + (" A row whose cells differ in HD95 unit shows no HD95 ('-')." if len(units) > 1 else ""),
        "",
        f"| backbone | policy | n | Dice ({split}) | dataset Dice ({split}) | IoU ({split}) | {hd95} | "
        "val Dice | floors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        failed = below_floors(e, floor)
        flag = ("**not clearly above: " + ", ".join(failed) + "**") if failed else ("above both" if floor else "-")
        lines.append(
            f"| {e['backbone']} | {e['policy']} | {e['n']} | {_f(e['dice'])} +- {_f(e['dice_std'])} | "
            f"{_f(e.get('dataset_dice'))} +- {_f(e.get('dataset_dice_std'))} | "
            f"{_f(e['iou'])} +- {_f(e['iou_std'])} | {_f(e['hd95'], 2)} +- {_f(e['hd95_std'], 2)} | "
            f"{_f(e['val_dice'])} +- {_f(e['val_dice_std'])} | {flag} |"
        )
    if paired:
        lines += ["", "Paired by seed (same labelled subset): difference of Dice, mean +- std over seeds, seeds "
                      "ahead, exact sign-flip p (two-sided).", "",
                  f"| backbone | comparison | n | Dice ({split}) diff | ahead | p | val Dice diff | ahead | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in paired:
            lines.append(
                f"| {e['backbone']} | {e['policy']} - {e['reference']} | {e['n']} | "
                f"{e['dice']:+.4f} +- {e['dice_std']:.4f} | {e['dice_ahead']}/{e['n']} | {e['dice_p']:.3f} | "
                f"{e['val_dice']:+.4f} +- {e['val_dice_std']:.4f} | {e['val_dice_ahead']}/{e['n']} | "
                f"{e['val_dice_p']:.3f} |"
            )
    line_floor = None
    if baseline is not None:
        b = baseline["summary"]
        line_floor = b["dice"]["mean"]
        mm = " mm" if baseline.get("hd95_unit") == "mm" else ""
        lines += ["", f"Floors (same labelled subsets, same metrics; `ahm bench baseline`): intensity lookup "
                      f"({len(baseline['rows'])} seed(s)): Dice ({split}) {_pm(b['dice'])}, dataset Dice "
                      f"{_pm(b.get('dataset_dice') or {})}, IoU {_pm(b['iou'])}, HD95 {_pm(b['hd95'], 2)}{mm}, "
                      f"val Dice {_pm(b['val_dice'])}."]
        nothing = baseline.get("empty_prediction")
        if nothing:
            lines.append(f"Predict nothing (all background): Dice ({split}) {_f(nothing.get('dice'))}, dataset Dice "
                         f"{_f(nothing.get('dataset_dice'))}, IoU {_f(nothing.get('iou'))}, HD95 "
                         f"{_f(nothing.get('hd95'), 2)}{mm}, val Dice {_f(nothing.get('val_dice'))}.")
        lines.append(f"A policy flagged **not clearly above** a floor is not above it on Dice or dataset Dice by more "
                     f"than {MIN_MARGIN} and two standard errors of its mean over seeds.")
    write_text(out / "results.md", "\n".join(lines) + "\n")
    _plot(out / "results.png", table, split, line_floor)


def _pm(m: dict[str, Any], digits: int = 4) -> str:
    return "-" if m.get("mean") is None else f"{m['mean']:.{digits}f} +- {m['std']:.{digits}f}"


def _plot(path: Path, table: list[dict[str, Any]], split: str, floor: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(dict.fromkeys(e["backbone"] for e in table))
    policies = list(dict.fromkeys(e["policy"] for e in table))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(policies) * max(1, len(backbones)), 3.6))
    width = 0.8 / max(1, len(backbones))
    for bi, backbone in enumerate(backbones):
        xs, means, stds = [], [], []
        for pi, policy in enumerate(policies):
            e = next((t for t in table if t["backbone"] == backbone and t["policy"] == policy), None)
            if e is None:
                continue
            xs.append(pi + bi * width)
            means.append(e["dice"])
            stds.append(e["dice_std"])
        ax.bar(xs, means, width=width, yerr=stds, capsize=3, label=backbone)
    if floor is not None:
        ax.axhline(floor, color="0.3", linestyle="--", linewidth=1, label="intensity lookup")
    ax.set_xticks([i + width * (len(backbones) - 1) / 2 for i in range(len(policies))], policies)
    ax.set_ylabel(f"mean Dice ({split})")
    lo = min([e["dice"] - e["dice_std"] for e in table if not math.isnan(e["dice"])]
             + ([floor] if floor is not None else []), default=0.0)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
