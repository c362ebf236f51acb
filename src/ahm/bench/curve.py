"""`ahm bench curve`: Dice against the number of labelled subjects and against the size of the unlabelled corpus.

Two grid axes beside policy, backbone and seed: `labels` (how many training subjects are labelled, `all` for
every one) and `corpus` (which dataset the encoder is pretrained on: by default the labelled set itself, or
other folders, e.g. brain-subjects sets of 50, 200 and 1000 subjects that share its val/test subjects).
Fine-tuning and evaluation are always on the labelled set. `scratch` does not pretrain, so its cells do not
depend on the corpus and are run once per labels value and seed.

Cells are directories; a finished cell holds `cell.json` and is never rerun, pretraining runs are shared by the
cells downstream of them, and seeds `first_seed ..` let two processes share one grid: resumable like
`ahm bench compare`, whose paired sign-flip statistics it reuses.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ahm.bench.compare import (
    _f,
    _mean_std,
    _merge,
    below_floors,
    check_grid,
    check_same_dims,
    check_settings,
    finetune_cell,
    floors,
    hd95_values,
    paired_differences,
    paired_entry,
    paired_stats,
    pretrain_cell,
    pretrain_figures,
    with_spatial_dims,
)
from ahm.config import FinetuneConfig, PretrainConfig, build_config, read_yaml
from ahm.errors import AhmError
from ahm.io import write_bytes, write_json, write_text

ALL = "all"
COLUMNS = ["backbone", "protocol", "policy", "pretrain_budget", "corpus", "corpus_subjects", "labels", "labelled_subjects", "seed", "dice",
           "dataset_dice", "iou", "hd95", "hd95_unit", "val_dice", "selection", "empty_cases", "pretrain_steps",
           "pretrain_final_loss", "hardness_ratio", "critic_spearman", "pretrain_s", "finetune_s"]
SAME = "data"  # the corpus name of "pretrain on the labelled set's own training subjects"
PROTOCOLS = ("finetune", "frozen")  # every weight trains; only the new layers train (`finetune --freeze-encoder`)
PROTOCOL_TEXT = {"finetune": "finetune (every weight trains)",
                 "frozen": "frozen (only the new layers train; scratch: a random frozen encoder)"}


def parse_budgets(text: str) -> list[int]:
    """`1000,3000,10000` -> [1000, 3000, 10000]: pretraining budgets in steps, positive and increasing."""
    budgets = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            budgets.append(int(part))
        except ValueError:
            raise AhmError(f"--pretrain-steps: {part!r} is not a number of steps") from None
    if not budgets:
        raise AhmError("--pretrain-steps: give at least one budget, e.g. 1000,3000,10000")
    for before, after in zip([0] + budgets, budgets):
        if after <= before:
            raise AhmError(f"--pretrain-steps {','.join(map(str, budgets))}: budgets must be positive and "
                           f"increasing ({after} after {before or 'the start'})")
    return budgets


def parse_protocols(text: str) -> list[str]:
    """`finetune,frozen` -> ['finetune', 'frozen']; AhmError naming the option for anything else."""
    protocols = list(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    for p in protocols:
        if p not in PROTOCOLS:
            raise AhmError(f"--protocol: {p!r} is not a protocol; choose from {', '.join(PROTOCOLS)}")
    if not protocols:
        raise AhmError("--protocol: give finetune, frozen or both")
    return protocols


def parse_labels(text: str) -> list[int | str]:
    """`1,2,5,all` -> [1, 2, 5, 'all']; AhmError naming the option for anything else."""
    values: list[int | str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.lower() == ALL:
            values.append(ALL)
            continue
        try:
            n = int(part)
        except ValueError:
            raise AhmError(f"--labels: {part!r} is not a number of subjects or 'all'") from None
        if n < 1:
            raise AhmError(f"--labels: {n} subjects; give at least 1")
        values.append(n)
    if not values:
        raise AhmError("--labels: give at least one value, e.g. 1,2,5,all")
    return list(dict.fromkeys(values))


def _train_subjects(path: str | Path, cfg: FinetuneConfig) -> int:
    from ahm.data import make_splits, open_dataset

    index = open_dataset(path, cfg.data)
    by_id = index.by_id()
    return len({by_id[i].subject for i in make_splits(index, cfg.data)["train"]})


def corpus_names(data: str | Path, corpora: Optional[list[str | Path]]) -> list[tuple[str, Path]]:
    """(name, folder) per pretraining corpus; the labelled set itself is named `data` whether it is the default or
    given in --corpus, so that its cells are the same cells either way (a grid on DATA alone, extended later by
    `--corpus DATA,bigger,...`, keeps them)."""
    paths = [Path(c) for c in corpora] if corpora else [Path(data)]
    for c in paths:
        if not c.is_dir():
            raise AhmError(f"--corpus {c}: not a folder")
    named = [(SAME if c.resolve() == Path(data).resolve() else c.name, c) for c in paths]
    if len({name for name, _ in named}) != len(named):
        raise AhmError("--corpus: two folders share one name; give folders with distinct names")
    return named


def run_curve(data: str | Path, out: str | Path, policies: list[str], backbones: list[str], labels: list[int | str],
              seeds: int, pretrain_steps: int | list[int], finetune_steps: int, corpora: Optional[list[str | Path]] = None,
              base_config: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None,
              split: str = "test", first_seed: int = 0, log: Optional[Callable[[str], None]] = None,
              finetune_epochs: Optional[int] = None, spatial_dims: Optional[int] = None,
              gather: bool = False, pretrain_epochs: Optional[int] = None,
              protocols: Optional[list[str]] = None) -> dict[str, Any]:
    """Run every unfinished cell of backbone x corpus x policy x labels x seed; write results.csv, results.md
    and results.png (Dice against each axis, error bars one std over seeds); return rows, table and paired.
    `gather`: run nothing, report the finished cells (while other processes still run the grid); the tables say
    how many cells are missing.

    Fine-tuning runs `finetune_steps` steps, or, with `finetune_epochs`, that many epochs over the cell's labelled
    slices but at least `finetune_steps` steps (a budget that grows with the labelled set). Pretraining likewise
    runs `pretrain_steps` steps, or, with `pretrain_epochs`, that many epochs over each corpus but at least
    `pretrain_steps` steps (a budget that grows with the corpus). Several `pretrain_steps` (increasing) make the
    pretraining budget an axis: each budget is its own pretraining run with its own warm-up and complete cosine
    decay (a mid-schedule snapshot of a longer run is not a budget point), cells named `-steps{B}`, and one
    trend test per policy of Dice against log10(steps). `protocols`: `finetune` (every weight trains, the
    default) and/or `frozen` (only the new layers train; its scratch arm is the same network with a random frozen
    encoder); the pretraining runs are shared by both. `spatial_dims` (2 or 3), when given, sets
    `data.spatial_dims` of both sections of `overrides` (3: volumes, HD95 in mm). The folder's `grid.json` records
    these settings; a grid folder run with others is refused (`check_settings`)."""
    from ahm.models.backbones import get_backbone

    check_grid(policies, backbones, seeds, first_seed)
    budgets = parse_budgets(",".join(map(str, [pretrain_steps] if isinstance(pretrain_steps, int) else pretrain_steps)))
    axis = len(budgets) > 1
    if axis and pretrain_epochs is not None:
        raise AhmError(f"--pretrain-steps {','.join(map(str, budgets))} with --pretrain-epochs: each point's budget "
                       "would be either; give a list of step budgets, or one floor with --pretrain-epochs")
    protocols = parse_protocols(",".join(protocols or ["finetune"]))
    for option, value in (("--finetune-epochs", finetune_epochs), ("--pretrain-epochs", pretrain_epochs)):
        if value is not None and value < 1:
            raise AhmError(f"{option} {value}: give at least 1")
    pre_length: dict[str, Any] = ({"train": {"steps": None, "epochs": pretrain_epochs}, "min_steps": budgets[0]}
                                  if pretrain_epochs else {"train": {"steps": budgets[0]}})
    length: dict[str, Any] = {"min_steps": finetune_steps} if finetune_epochs else {"min_steps": None}
    length_train: dict[str, Any] = ({"epochs": finetune_epochs, "steps": None} if finetune_epochs
                                    else {"epochs": None, "steps": finetune_steps})
    out = Path(out)
    overrides = with_spatial_dims(overrides or {}, spatial_dims)
    check_same_dims(overrides)
    say = log or (lambda msg: None)
    ft_base = build_config(FinetuneConfig, file=base_config, overrides=_merge(overrides.get("finetune", {}),
                                                                              {"data": {"path": str(data)}}),
                           nulls=True)
    n_train = _train_subjects(data, ft_base)
    for n in labels:
        if n != ALL and int(n) > n_train:
            raise AhmError(f"--labels {n}: {data} has {n_train} training subjects")
    corpus_list = corpus_names(data, corpora)
    corpus_subjects: dict[str, int] = {}
    for name, path in corpus_list:
        pre_data = build_config(PretrainConfig, file=base_config, overrides=_merge(overrides.get("pretrain", {}), {
            "data": {"path": str(path)}}), nulls=True)
        corpus_subjects[name] = _train_subjects(path, FinetuneConfig(data=pre_data.data))
    check_settings(out, {"pretrain_steps": budgets if axis else budgets[0], "protocols": protocols,
                         "pretrain_epochs": pretrain_epochs,
                         "finetune_steps": finetune_steps, "finetune_epochs": finetune_epochs, "split": split,
                         "config": {"file": read_yaml(base_config) if base_config else None, "overrides": overrides}})

    cells = []
    for backbone in backbones:
        for policy in policies:
            arms = ([(name, path, b) for name, path in corpus_list for b in budgets] if policy != "scratch"
                    else [("-", Path(data), None)])
            for name, path, steps in arms:
                for n in labels:
                    for protocol in protocols:
                        for seed in range(first_seed, first_seed + seeds):
                            cells.append((backbone, policy, name, path, steps, n, protocol, seed))
    # the smallest budget first (scratch with it): a grid cut short still has whole curves at its small budgets
    cells.sort(key=lambda c: c[4] or 0)
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    for k, (backbone, policy, name, path, steps, n, protocol, seed) in enumerate(cells, 1):
        at_budget = f"-steps{steps}" if axis and steps else ""
        frozen = protocol == "frozen"
        cell_dir = (out / "cells" / f"{backbone}-{policy}-corpus{name}{at_budget}-labels{n}"
                    f"{'-frozen' if frozen else ''}-seed{seed}")
        done = cell_dir / "cell.json"
        pre_dir = out / "pretrain" / f"{backbone}-{policy}-corpus{name}{at_budget}-seed{seed}"
        if done.is_file():
            row = json.loads(done.read_text())
            if (policy != "scratch" and not {"hardness_ratio", "pretrain_steps"} <= set(row)
                    and (pre_dir / "summary.json").is_file()):
                # a cell finished before these figures were recorded: its pretraining run has them
                row.update(pretrain_figures(json.loads((pre_dir / "summary.json").read_text())))
            rows.append(row)
            say(f"[{k}/{len(cells)}] {cell_dir.name}: done earlier, kept")
            continue
        if gather:
            missing.append(cell_dir.name)
            continue
        say(f"[{k}/{len(cells)}] {cell_dir.name}")
        row: dict[str, Any] = {"backbone": backbone, "protocol": protocol, "policy": policy,
                               "pretrain_budget": steps if axis else None, "corpus": name,
                               "corpus_subjects": corpus_subjects.get(name), "labels": n,
                               "labelled_subjects": n_train if n == ALL else int(n), "seed": seed}
        init = "random" if frozen else None  # the frozen protocol's scratch arm: a random frozen encoder
        if policy != "scratch":
            pre_cfg = build_config(PretrainConfig, file=base_config, overrides=_merge(_merge(
                overrides.get("pretrain", {}), {
                    "data": {"path": str(path)}, "model": {"backbone": backbone}, "masking": {"policy": policy},
                    **pre_length}), {"train": {"seed": seed, **({"steps": steps} if axis else {})}}), nulls=True)
            summary, pretrain_s = pretrain_cell(pre_cfg, pre_dir)
            row["pretrain_s"] = pretrain_s
            row.update(pretrain_figures(summary))
            init = str(pre_dir)
        budget: dict[str, Any] = ({"labels_fraction": 1.0, "labels_subjects": None} if n == ALL
                                  else {"labels_fraction": 1.0, "labels_subjects": int(n)})
        ft_cfg = build_config(FinetuneConfig, file=base_config, overrides=_merge(overrides.get("finetune", {}), {
            "data": {"path": str(data)}, "model": {"backbone": backbone}, "segmenter": get_backbone(backbone).segmenter,
            "init": init, "freeze_encoder": frozen, **budget, **length, "train": {**length_train, "seed": seed},
        }), nulls=True)
        row.update(finetune_cell(ft_cfg, cell_dir / "finetune", data, split))
        write_json(done, row)
        rows.append(row)
    if gather:
        if not rows:
            raise AhmError(f"--gather: no finished cell of this grid in {out}")
        say(f"--gather: {len(rows)} of {len(cells)} cells finished; {len(missing)} not run"
            + (f" (first: {missing[0]})" if missing else ""))
    table = aggregate(rows)
    paired = paired_by_point(rows)
    # The floors each point must clear: intensity alone, fitted on the same labelled subjects per seed.
    from ahm.bench.baseline import run_baseline

    baselines = {}
    for n in labels:
        baselines[str(n)] = run_baseline(data, 1.0, seeds, first_seed, split=split, data_cfg=ft_base.data,
                                         labels_subjects=None if n == ALL else int(n))
        write_json(out / f"baseline-labels{n}.json", baselines[str(n)])
    write_results(out, rows, table, paired, split, baselines, missing=len(missing))
    return {"rows": rows, "table": table, "paired": paired, "train_subjects": n_train, "baselines": baselines,
            "missing": missing}


def protocol(r: dict[str, Any]) -> str:
    """A row's protocol; cells from before the frozen protocol existed were all fine-tuned whole."""
    return r.get("protocol") or "finetune"


def _arm(r: dict[str, Any]) -> tuple:
    """What else, besides the corpus, a pretrained point is defined by: its protocol and pretraining budget."""
    return (protocol(r), r.get("pretrain_budget"))


def _point(r: dict[str, Any]) -> tuple:
    return (r["backbone"], protocol(r), r["policy"], r["corpus"], r.get("pretrain_budget"), str(r["labels"]))


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (backbone, policy, corpus, labels), in first-seen order."""
    points = list(dict.fromkeys(_point(r) for r in rows))
    table = []
    for point in points:
        group = [r for r in rows if _point(r) == point]
        first = group[0]
        entry: dict[str, Any] = {"backbone": first["backbone"], "protocol": protocol(first), "policy": first["policy"],
                                 "pretrain_budget": first.get("pretrain_budget"), "corpus": first["corpus"],
                                 "corpus_subjects": first.get("corpus_subjects"), "labels": first["labels"],
                                 "labelled_subjects": first["labelled_subjects"], "n": len(group)}
        for metric in ("dice", "dataset_dice", "iou", "hd95", "val_dice"):
            values = hd95_values(group) if metric == "hd95" else [r.get(metric) for r in group]
            entry[metric], entry[metric + "_std"] = _mean_std(values)
        table.append(entry)
    return table


def paired_by_point(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At every (protocol, corpus, budget, labels) point, each policy minus scratch (and minus random), paired by
    seed, with `bench compare`'s exact sign-flip p. Scratch cells (corpus '-') pair with every corpus and budget of
    their protocol."""
    out = []
    corpora = [c for c in dict.fromkeys(r["corpus"] for r in rows) if c != "-"]
    budgets = list(dict.fromkeys(r.get("pretrain_budget") for r in rows if r["corpus"] != "-"))
    for proto in dict.fromkeys(protocol(r) for r in rows):
        for labels in dict.fromkeys(str(r["labels"]) for r in rows):
            for corpus in corpora:
                for budget in budgets:
                    group = [r for r in rows if str(r["labels"]) == labels and protocol(r) == proto
                             and (r["corpus"] == "-" or (r["corpus"], r.get("pretrain_budget")) == (corpus, budget))]
                    for entry in paired_differences(group):
                        out.append({**entry, "protocol": proto, "corpus": corpus, "pretrain_budget": budget,
                                    "labels": labels})
    return out


def paired_by_corpus(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Does a larger unlabelled corpus help? At every labels point, each pretraining policy on each other corpus
    minus the same policy on the reference corpus (the labelled set's own training subjects, `data`, when the grid
    has it; else the first corpus), paired by seed (same labelled subjects, same seed), with the exact sign-flip p;
    ordered by corpus size."""
    corpora = [c for c in dict.fromkeys(r["corpus"] for r in rows) if c != "-"]
    if len(corpora) < 2:
        return []
    reference = SAME if SAME in corpora else corpora[0]
    sizes = {r["corpus"]: r.get("corpus_subjects") or 0 for r in rows}
    others = sorted((c for c in corpora if c != reference), key=lambda c: (sizes.get(c, 0), c))
    by_cell = {(r["backbone"], r["policy"], r["corpus"], str(r["labels"]), _arm(r), r["seed"]): r for r in rows}
    out = []
    for arm in dict.fromkeys(_arm(r) for r in rows if r["corpus"] != "-"):
        for labels in dict.fromkeys(str(r["labels"]) for r in rows):
            for backbone in dict.fromkeys(r["backbone"] for r in rows):
                for policy in dict.fromkeys(r["policy"] for r in rows if r["corpus"] != "-"):
                    for corpus in others:
                        pairs = [(by_cell[k], by_cell[(backbone, policy, reference, labels, arm, k[5])])
                                 for k in by_cell if k[:5] == (backbone, policy, corpus, labels, arm)
                                 and (backbone, policy, reference, labels, arm, k[5]) in by_cell]
                        if pairs:
                            out.append({"backbone": backbone, "protocol": arm[0], "pretrain_budget": arm[1],
                                        "policy": policy, "labels": labels, "corpus": corpus,
                                        "corpus_subjects": sizes.get(corpus), "reference": reference,
                                        "reference_subjects": sizes.get(reference), **paired_entry(pairs)})
    return out


MIN_TREND_CORPORA = 3  # with two corpora a slope is only their paired difference, rescaled


def corpus_trend(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Does Dice grow with the corpus? One test per (backbone, protocol, budget, labels, policy) instead of one per
    corpus pair.

    Per seed, the least-squares slope of Dice against log10(corpus subjects) over every corpus that policy was
    pretrained on (Dice gained per tenfold corpus), for seeds that have a cell on each of them (at least
    `MIN_TREND_CORPORA` corpora); then the mean and sample std of the seeds' slopes, the seeds with a positive
    slope, and the exact sign-flip p of `bench compare` on them (`paired_stats`) (the same for the validation Dice). Written by
    hand: a per-seed regression followed by a permutation test on its slopes is two lines of numpy, and no
    library we use offers this paired trend test."""
    sizes = {r["corpus"]: r.get("corpus_subjects") for r in rows if r["corpus"] != "-"}
    out = []
    for arm in dict.fromkeys(_arm(r) for r in rows if r["corpus"] != "-"):
        mine = [r for r in rows if r["corpus"] != "-" and _arm(r) == arm and sizes.get(r["corpus"])]
        for entry in _trends(mine, "corpus", lambda c: float(sizes[c]), MIN_TREND_CORPORA):
            entry["corpora"] = entry.pop("values")
            entry["corpus_subjects"] = [sizes[c] for c in entry["corpora"]]
            out.append({"protocol": arm[0], "pretrain_budget": arm[1], **entry})
    return out


MIN_TREND_BUDGETS = 2
TARGET_GAIN = 0.03  # the Dice over scratch that makes the positive control succeed


def budget_trend(rows: list[dict[str, Any]], target: float = TARGET_GAIN) -> list[dict[str, Any]]:
    """Does Dice grow with pretraining compute? Per (backbone, protocol, corpus, labels, policy): each seed's
    least-squares slope of Dice against log10(pretraining steps) over the grid's budgets (Dice gained per tenfold
    budget), their mean, spread, seeds up and exact sign-flip p, as `corpus_trend` does for the corpus. With scratch
    cells of the same protocol, labels and seeds, also the line fitted to the policy's paired gain over scratch
    (mean over seeds of each seed's intercept and slope) and the budget at which it would reach `target`:
    `crosses_at` (an extrapolation when beyond the largest budget; None when the line does not rise to it)."""
    out = []
    scratch = {(r["backbone"], protocol(r), str(r["labels"]), r["seed"]): r for r in rows if r["corpus"] == "-"}
    pretrained = [r for r in rows if r["corpus"] != "-" and r.get("pretrain_budget")]
    for proto, corpus in dict.fromkeys((protocol(r), r["corpus"]) for r in pretrained):
        mine = [r for r in pretrained if (protocol(r), r["corpus"]) == (proto, corpus)]
        for entry in _trends(mine, "pretrain_budget", float, MIN_TREND_BUDGETS):
            entry["budgets"] = entry.pop("values")
            x = np.log10(np.asarray(entry["budgets"], dtype=np.float64))
            fits = []
            for seed in entry["seeds"]:
                ref = scratch.get((entry["backbone"], proto, entry["labels"], seed))
                cells = [next(r for r in mine if (r["backbone"], r["policy"], str(r["labels"]), r["seed"],
                                                  r["pretrain_budget"]) == (entry["backbone"], entry["policy"],
                                                                            entry["labels"], seed, b))
                         for b in entry["budgets"]]
                if ref is not None and ref.get("dice") is not None and all(c.get("dice") is not None for c in cells):
                    gain = np.asarray([c["dice"] - ref["dice"] for c in cells], dtype=np.float64)
                    fits.append(np.polyfit(x, gain, 1))
            crossing: dict[str, Any] = {"gain_seeds": len(fits)}
            if fits:
                slope, intercept = (float(v) for v in np.mean(fits, axis=0))
                crossing.update({"gain_slope": slope, "gain_intercept": intercept,
                                 "gain_at_largest": intercept + slope * float(x[-1]),
                                 "crosses_at": (float(10 ** ((target - intercept) / slope)) if slope > 0 else None)})
            out.append({"protocol": proto, "corpus": corpus, **entry, **crossing})
    return out


def _trends(rows: list[dict[str, Any]], along: str, x_of: Callable[[Any], float],
            min_points: int) -> list[dict[str, Any]]:
    """Per (backbone, labels, policy) of `rows`: each seed's least-squares slope of Dice (and validation Dice)
    against log10(x_of(row[along])) over every value of `along` the rows hold, for the seeds with a cell at each
    (at least `min_points` distinct x), then `paired_stats` over the seeds' slopes."""
    by_cell = {(r["backbone"], r["policy"], r[along], str(r["labels"]), r["seed"]): r for r in rows}
    out = []
    for labels in dict.fromkeys(str(r["labels"]) for r in rows):
        for backbone in dict.fromkeys(r["backbone"] for r in rows):
            for policy in dict.fromkeys(r["policy"] for r in rows):
                mine = [r for r in rows if (r["backbone"], r["policy"], str(r["labels"])) == (backbone, policy, labels)]
                values = sorted({r[along] for r in mine}, key=lambda v: (x_of(v), str(v)))
                if len({x_of(v) for v in values}) < min_points:
                    continue
                seeds = [s for s in dict.fromkeys(r["seed"] for r in mine)
                         if all((backbone, policy, v, labels, s) in by_cell for v in values)]
                if not seeds:
                    continue
                x = np.log10([x_of(v) for v in values])
                entry: dict[str, Any] = {"backbone": backbone, "policy": policy, "labels": labels, "n": len(seeds),
                                         "values": values, "seeds": seeds}
                for metric in ("dice", "val_dice"):
                    slopes = []
                    for s in seeds:
                        y = [by_cell[(backbone, policy, v, labels, s)].get(metric) for v in values]
                        if all(v is not None for v in y):
                            slopes.append(float(np.polyfit(x, np.asarray(y, dtype=np.float64), 1)[0]))
                    entry.update(paired_stats(metric, slopes))
                out.append(entry)
    return out


def _fmt(value: float, std: float, digits: int = 4) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f} +- {std:.{digits}f}"


def write_results(out: Path, rows: list[dict[str, Any]], table: list[dict[str, Any]], paired: list[dict[str, Any]],
                  split: str, baselines: Optional[dict[str, dict[str, Any]]] = None, missing: int = 0) -> None:
    """results.csv, results.md and results.png; `baselines` ({labels: `run_baseline` document}) adds the floors:
    a table of them, and per point whether it is clearly above both."""
    baselines = baselines or {}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in COLUMNS})
    write_text(out / "results.csv", buf.getvalue())
    units = sorted({str(r["hd95_unit"]) for r in rows if r.get("hd95_unit")})
    hd95 = f"HD95 ({split}, mm)" if units == ["mm"] else f"HD95 ({split})"
    protos = list(dict.fromkeys(protocol(r) for r in rows))
    budgets = [b for b in dict.fromkeys(r.get("pretrain_budget") for r in rows) if b]
    # one protocol and one budget: named once above the tables; else a column each in every table
    wide = len(protos) > 1 or len(budgets) > 1
    head, rule = (" protocol | budget (steps) |", "---|---|") if wide else ("", "")

    def arm(e: dict[str, Any]) -> str:
        return f" {e.get('protocol') or 'finetune'} | {e.get('pretrain_budget') or '-'} |" if wide else ""
    lines = [f"Mean +- sample std over seeds; Dice on the `{split}` split (never used for choices); val Dice is the "
             "fine-tuning validation score used for model selection. `labels`: labelled training subjects; "
             "`corpus`: the set the encoder was pretrained on (its training subjects; '-': no pretraining)."
             + (f" HD95 in {'; '.join(units)}." if units else "")
             + (" A row whose cells differ in HD95 unit shows no HD95 ('-')." if len(units) > 1 else "")
             + (f" **Partial: {len(rows)} of {len(rows) + missing} cells finished** (gathered while the grid "
                "runs; `n` is the seeds finished per point, pairs only seeds finished in both arms)."
                if missing else "")
             + " Protocol: " + "; ".join(PROTOCOL_TEXT[p] for p in protos) + "."
             + ("" if wide or not budgets else f" Pretraining budget: {budgets[0]} steps."), "",
             f"| backbone |{head} policy | corpus (subjects) | labels (subjects) | n | Dice ({split}) | {hd95} | "
             f"val Dice | floors |", f"|---|{rule}---|---|---|---|---|---|---|---|"]
    for e in sorted(table, key=lambda e: (e["backbone"], e.get("protocol") or "", e["corpus"], e["policy"],
                                          e.get("pretrain_budget") or 0, e["labelled_subjects"])):
        corpus = e["corpus"] if e["corpus"] == "-" else f"{e['corpus']} ({e['corpus_subjects']})"
        floor = floors(baselines.get(str(e["labels"])))
        failed = below_floors(e, floor)
        flag = ("**not clearly above: " + ", ".join(failed) + "**") if failed else ("above both" if floor else "-")
        lines.append(f"| {e['backbone']} |{arm(e)} {e['policy']} | {corpus} | {e['labels']} ({e['labelled_subjects']}) | "
                     f"{e['n']} | {_fmt(e['dice'], e['dice_std'])} | {_fmt(e['hd95'], e['hd95_std'], 2)} | "
                     f"{_fmt(e['val_dice'], e['val_dice_std'])} | {flag} |")
    if baselines:
        lines += ["", "Floors (`ahm bench baseline --labels-subjects N`: an intensity-to-class lookup fitted on the "
                      "same labelled subjects per seed, and predicting nothing; same metrics). A point flagged **not "
                      "clearly above** a floor is not above it on Dice or dataset Dice by more than 0.01 and two "
                      "standard errors of its mean over seeds.", "",
                  f"| labels | n | intensity lookup: Dice ({split}) | {hd95} | val Dice | predict nothing: "
                  f"Dice ({split}) | {hd95} |", "|---|---|---|---|---|---|---|"]
        for labels, doc in baselines.items():
            b, nothing = doc["summary"], doc.get("empty_prediction") or {}
            lines.append(f"| {labels} | {len(doc['rows'])} | {_fmt(b['dice']['mean'], b['dice']['std'])} | "
                         f"{_fmt(b['hd95']['mean'], b['hd95']['std'], 2)} | "
                         f"{_fmt(b['val_dice']['mean'], b['val_dice']['std'])} | "
                         f"{_f(nothing.get('dice'))} | {_f(nothing.get('hd95'), 2)} |")
    if paired:
        lines += ["", "Paired by seed at each point (same labelled subjects): difference of Dice, mean +- std, seeds "
                      "ahead, exact sign-flip p (two-sided).", "",
                  f"| backbone |{head} corpus | labels | comparison | n | Dice ({split}) diff | ahead | p | "
                  "val Dice diff | ahead | p |", f"|---|{rule}---|---|---|---|---|---|---|---|---|---|"]
        for e in paired:
            lines.append(f"| {e['backbone']} |{arm(e)} {e['corpus']} | {e['labels']} | {e['policy']} - {e['reference']} | "
                         f"{e['n']} | {e['dice']:+.4f} +- {e['dice_std']:.4f} | {e['dice_ahead']}/{e['n']} | "
                         f"{e['dice_p']:.3f} | {e['val_dice']:+.4f} +- {e['val_dice_std']:.4f} | "
                         f"{e['val_dice_ahead']}/{e['n']} | {e['val_dice_p']:.3f} |")
    by_corpus = paired_by_corpus(rows)
    if by_corpus:
        lines += ["", "Corpus size, paired by seed: each policy pretrained on a corpus minus the same policy "
                      "pretrained on the reference corpus, fine-tuned on the same labelled subjects with the same "
                      "seed; exact sign-flip p (two-sided).", "",
                  f"| backbone |{head} labels | policy | corpus - reference (subjects) | n | Dice ({split}) diff | "
                  "ahead | p | val Dice diff | ahead | p |", f"|---|{rule}---|---|---|---|---|---|---|---|---|---|"]
        for e in by_corpus:
            lines.append(f"| {e['backbone']} |{arm(e)} {e['labels']} | {e['policy']} | {e['corpus']} ({e['corpus_subjects']}) "
                         f"- {e['reference']} ({e['reference_subjects']}) | {e['n']} | {e['dice']:+.4f} +- "
                         f"{e['dice_std']:.4f} | {e['dice_ahead']}/{e['n']} | {e['dice_p']:.3f} | "
                         f"{e['val_dice']:+.4f} +- {e['val_dice_std']:.4f} | {e['val_dice_ahead']}/{e['n']} | "
                         f"{e['val_dice_p']:.3f} |")
    trend = corpus_trend(rows)
    if trend:
        lines += ["", "Corpus trend, paired by seed: per seed, the least-squares slope of Dice against log10(corpus "
                      "subjects) over every corpus the policy was pretrained on (Dice gained per tenfold corpus; "
                      "seeds with a cell on each corpus), then mean +- std of the seeds' slopes, seeds with a "
                      "positive slope, exact sign-flip p (two-sided). One test per policy and labels.", "",
                  f"| backbone |{head} labels | policy | corpora (subjects) | n | Dice ({split}) slope | up | p | "
                  "val Dice slope | up | p |", f"|---|{rule}---|---|---|---|---|---|---|---|---|---|"]
        for e in trend:
            lines.append(f"| {e['backbone']} |{arm(e)} {e['labels']} | {e['policy']} | "
                         f"{', '.join(str(n) for n in e['corpus_subjects'])} | {e['n']} | {e['dice']:+.4f} +- "
                         f"{e['dice_std']:.4f} | {e['dice_ahead']}/{e['n']} | {e['dice_p']:.3f} | "
                         f"{e['val_dice']:+.4f} +- {e['val_dice_std']:.4f} | {e['val_dice_ahead']}/{e['n']} | "
                         f"{e['val_dice_p']:.3f} |")
    by_budget = budget_trend(rows)
    if by_budget:
        lines += ["", "Budget trend, paired by seed: per seed, the least-squares slope of Dice against log10(pretraining "
                      "steps) over the grid's budgets (Dice gained per tenfold budget; each budget its own run with "
                      "its own complete schedule), mean +- std over seeds, seeds up, exact sign-flip p (two-sided). "
                      f"Gain: the line fitted to the paired gain over scratch (same protocol, labels and seeds), its "
                      f"value at the largest budget, and the budget where it reaches +{TARGET_GAIN:g} (beyond the "
                      "largest budget an extrapolation; '-' when it does not rise).", "",
                  f"| backbone | protocol | corpus | labels | policy | budgets (steps) | n | Dice ({split}) slope | up | "
                  "p | val Dice slope | up | p | gain at largest | reaches gain at (steps) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in by_budget:
            crosses = e.get("crosses_at")
            lines.append(f"| {e['backbone']} | {e['protocol']} | {e['corpus']} | {e['labels']} | {e['policy']} | "
                         f"{', '.join(str(b) for b in e['budgets'])} | {e['n']} | {e['dice']:+.4f} +- "
                         f"{e['dice_std']:.4f} | {e['dice_ahead']}/{e['n']} | {e['dice_p']:.3f} | "
                         f"{e['val_dice']:+.4f} +- {e['val_dice_std']:.4f} | {e['val_dice_ahead']}/{e['n']} | "
                         f"{e['val_dice_p']:.3f} | "
                         + (f"{e['gain_at_largest']:+.4f}" if "gain_at_largest" in e else "-") + " | "
                         + ("-" if crosses is None else f"{crosses:.3g}") + " |")
    write_text(out / "results.md", "\n".join(lines) + "\n")
    _plot(out / "results.png", table, split, baselines, rows, by_corpus)


def _budget_panel(ax, table: list[dict[str, Any]], styles: dict[str, dict], split: str,
                  label_names: dict[str, str], multi: bool) -> None:
    """Dice against pretraining steps, one line per (backbone, policy, protocol, corpus, labels); scratch of each
    protocol and labels as a level (solid: finetune, dotted: frozen)."""
    for key in dict.fromkeys((e["backbone"], e["policy"], e.get("protocol"), e["corpus"], str(e["labels"]))
                             for e in table if e.get("pretrain_budget")):
        pts = sorted((e for e in table if e.get("pretrain_budget") and (
            e["backbone"], e["policy"], e.get("protocol"), e["corpus"], str(e["labels"])) == key),
            key=lambda e: e["pretrain_budget"])
        look = dict(styles["labels"][key[4]])
        if key[2] == "frozen":
            look["markerfacecolor"] = "none"
        ax.errorbar([e["pretrain_budget"] for e in pts], [e["dice"] for e in pts], yerr=[e["dice_std"] for e in pts],
                    capsize=3, color=styles["colour"][key[:2]], **look)
    for e in table:
        if e["corpus"] == "-":
            ax.axhline(e["dice"], linestyle=":" if e.get("protocol") == "frozen" else "-", linewidth=1, color="0.6")
    _log_ticks(ax, [e["pretrain_budget"] for e in table if e.get("pretrain_budget")])
    ax.set_xlabel("pretraining steps; grey: scratch (dotted: frozen); hollow markers: frozen")
    ax.set_ylabel(f"mean Dice ({split})")
    pretrained = {(e["backbone"], e["policy"]) for e in table if e.get("pretrain_budget")}
    _legend(ax, styles, "labels", label_names, multi, policies=pretrained)


def _log_ticks(ax, values: list[int]) -> None:
    """A log axis labelled at the grid's own values (1, 2, 5, 42), not at powers of ten."""
    ticks = sorted({int(v) for v in values if v})
    ax.set_xscale("log")
    # a label close to the one before (42 and 50 subjects) goes a line lower, so that the two do not run together
    ax.set_xticks(ticks, [("\n" if i and t < 1.5 * ticks[i - 1] else "") + str(t) for i, t in enumerate(ticks)])
    ax.minorticks_off()


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]


def _look(i: int) -> dict[str, str]:
    return {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}


def plot_styles(table: list[dict[str, Any]]) -> dict[str, dict]:
    """How the plot tells its lines apart: one colour per (backbone, policy), the same in every panel, and one line
    style and marker per corpus (left panel) and per labels (middle and right). A colour cycle alone gives 17 lines
    (4 policies on 4 corpora and scratch) only 10 colours, so different lines would share one."""
    policies = list(dict.fromkeys((e["backbone"], e["policy"]) for e in table))
    corpora = list(dict.fromkeys(e["corpus"] for e in table))
    labels = list(dict.fromkeys(str(e["labels"]) for e in table))
    return {"colour": {k: f"C{i % 10}" for i, k in enumerate(policies)},
            "corpus": {c: _look(i) for i, c in enumerate(corpora)},
            "labels": {n: _look(i) for i, n in enumerate(labels)}}


def _legend(ax, styles: dict[str, dict], kind: str, names: dict[str, str], multi_backbone: bool,
            extra: tuple = (), policies: Optional[set] = None) -> None:
    """Two keys under the panel: the colours of its policies (default: all) and the line styles of `kind` (corpus
    or labels) named in `names`."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linewidth=2, label=p + (f" [{b}]" if multi_backbone else ""))
               for (b, p), c in styles["colour"].items() if policies is None or (b, p) in policies]
    handles += [Line2D([], [], color="0.35", label=names.get(k, k), **look)
                for k, look in styles[kind].items() if k in names] + list(extra)
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)


def _plot(path: Path, table: list[dict[str, Any]], split: str,
          baselines: Optional[dict[str, dict[str, Any]]] = None, rows: Optional[list[dict[str, Any]]] = None,
          by_corpus: Optional[list[dict[str, Any]]] = None) -> None:
    """Left: Dice against labelled subjects, one line per (backbone, policy, corpus). When the grid has more than
    one corpus, middle: Dice against corpus subjects, one line per (backbone, policy, labels), scratch as a
    grey level; right: the same paired by seed (each corpus minus the same policy on the reference corpus, the
    corpus table's differences), where the spread between seeds' labelled subjects, which dominates the middle
    panel's bars, cancels. Error bars: one sample std over seeds (right: of the paired differences)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = {e["corpus"] for e in table if e["corpus"] != "-"}
    if by_corpus is None:  # `paired_by_corpus(rows)`, unless the caller has it already
        by_corpus = paired_by_corpus(rows or [])
    by_corpus = by_corpus if len(corpora) > 1 else []
    budgets = {e.get("pretrain_budget") for e in table if e.get("pretrain_budget")}
    panels = 1 + (len(corpora) > 1) + bool(by_corpus) + (len(budgets) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6), squeeze=False)
    styles = plot_styles(table)
    multi = len({e["backbone"] for e in table}) > 1
    subjects_of = {e["corpus"]: e["corpus_subjects"] for e in table}
    label_names = {n: f"{n} labelled" for n in styles["labels"]}
    ax = axes[0][0]
    # with a budget axis the left panels show the largest budget (the budget panel shows the others)
    shown = [e for e in table if e.get("pretrain_budget") in (None, max(budgets, default=None))]
    for key in dict.fromkeys((e["backbone"], e["policy"], e["corpus"], e.get("protocol")) for e in shown):
        pts = sorted((e for e in shown if (e["backbone"], e["policy"], e["corpus"], e.get("protocol")) == key),
                     key=lambda e: e["labelled_subjects"])
        look = dict(styles["corpus"][key[2]])
        if key[3] == "frozen":
            look["markerfacecolor"] = "none"
        ax.errorbar([e["labelled_subjects"] for e in pts], [e["dice"] for e in pts],
                    yerr=[e["dice_std"] for e in pts], capsize=3, color=styles["colour"][key[:2]], **look)
    floor: list = []
    if baselines:
        subjects = {str(r["labels"]): r["labelled_subjects"] for r in rows or []}
        pts = sorted((subjects[k], doc["summary"]["dice"]["mean"]) for k, doc in baselines.items() if k in subjects)
        if pts:
            floor = ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.3", linestyle="--", linewidth=1,
                            marker="x", label="intensity lookup (floor)")
    _log_ticks(ax, [e["labelled_subjects"] for e in table])
    ax.set_xlabel("labelled training subjects")
    ax.set_ylabel(f"mean Dice ({split})")
    # one corpus: the colours alone name the lines
    corpus_names = {} if len(corpora) <= 1 else {
        c: ("no pretraining" if c == "-" else c if subjects_of.get(c) is None else f"{c} ({subjects_of[c]})")
        for c in styles["corpus"]}
    _legend(ax, styles, "corpus", corpus_names, multi, extra=tuple(floor))
    if len(corpora) > 1:
        ax = axes[0][1]
        for key in dict.fromkeys((e["backbone"], e["policy"], str(e["labels"])) for e in table
                                 if e["corpus"] != "-"):
            pts = sorted((e for e in table if (e["backbone"], e["policy"], str(e["labels"])) == key
                          and e["corpus"] != "-"), key=lambda e: e["corpus_subjects"])
            ax.errorbar([e["corpus_subjects"] for e in pts], [e["dice"] for e in pts],
                        yerr=[e["dice_std"] for e in pts], capsize=3, color=styles["colour"][key[:2]],
                        **styles["labels"][key[2]])
        for e in table:
            if e["corpus"] == "-":
                ax.axhline(e["dice"], linestyle="-", linewidth=1, color="0.6")
        _log_ticks(ax, [e["corpus_subjects"] for e in table if e["corpus"] != "-"])
        ax.set_xlabel("unlabelled corpus (training subjects); grey: scratch")
        ax.set_ylabel(f"mean Dice ({split})")
        pretrained = {(e["backbone"], e["policy"]) for e in table if e["corpus"] != "-"}
        _legend(ax, styles, "labels", label_names, multi, policies=pretrained)
    if by_corpus:
        ax = axes[0][2]
        for key in dict.fromkeys((e["backbone"], e["policy"], e["labels"]) for e in by_corpus):
            pts = sorted((e for e in by_corpus if (e["backbone"], e["policy"], e["labels"]) == key),
                         key=lambda e: e["corpus_subjects"] or 0)
            x = [pts[0]["reference_subjects"]] + [e["corpus_subjects"] for e in pts]
            ax.errorbar(x, [0.0] + [e["dice"] for e in pts], yerr=[0.0] + [e["dice_std"] for e in pts],
                        capsize=3, color=styles["colour"][key[:2]], **styles["labels"][str(key[2])])
        ax.axhline(0.0, linestyle="--", linewidth=1, color="0.4")
        _log_ticks(ax, [e["corpus_subjects"] for e in by_corpus] + [by_corpus[0]["reference_subjects"]])
        ax.set_xlabel(f"unlabelled corpus (training subjects); paired minus {by_corpus[0]['reference']}")
        ax.set_ylabel(f"Dice ({split}) difference, paired by seed")
        _legend(ax, styles, "labels", label_names, multi, policies={(e["backbone"], e["policy"]) for e in by_corpus})
    if len(budgets) > 1:
        _budget_panel(axes[0][panels - 1], table, styles, split, label_names, multi)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")  # "tight": the keys under the panels included
    plt.close(fig)
    write_bytes(path, buf.getvalue())
