"""`ahm bench curve`: Dice against the number of labelled subjects and against the size of the unlabelled corpus.

Two grid axes beside policy, backbone and seed: `labels` (how many training subjects are labelled, `all` for
every one) and `corpus` (which dataset the encoder is pretrained on: by default the labelled set itself, or
other folders, e.g. brain-subjects sets of 50, 200 and 1000 subjects that share its val/test subjects).
Fine-tuning and evaluation are always on the labelled set. `scratch` does not pretrain, so its cells do not
depend on the corpus and are run once per labels value and seed.

Cells are directories; a finished cell holds `cell.json` and is never rerun, pretraining runs are shared by the
cells downstream of them, and seeds `first_seed ..` let two processes share one grid: resumable like
`ahm bench compare`, whose paired sign-flip statistics it reuses.

This module plans the grid and runs its cells; `curve_stats` pairs and aggregates the finished cells and
`curve_render` writes the tables and the plot.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ahm.bench.compare import (
    _merge,
    check_grid,
    check_same_dims,
    check_settings,
    finetune_cell,
    pretrain_cell,
    pretrain_figures,
    with_spatial_dims,
)
from ahm.bench.curve_render import write_results
from ahm.bench.curve_stats import SAME, aggregate, paired_by_point
from ahm.config import FinetuneConfig, PretrainConfig, build_config, read_yaml
from ahm.errors import AhmError
from ahm.io import write_json

ALL = "all"
PROTOCOLS = ("finetune", "frozen")  # every weight trains; only the new layers train (`finetune --freeze-encoder`)


def parse_budgets(text: str, option: str = "--pretrain-steps") -> list[int]:
    """`1000,3000,10000` -> [1000, 3000, 10000]: pretraining budgets in steps, positive and increasing."""
    budgets = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            budgets.append(int(part))
        except ValueError:
            raise AhmError(f"{option}: {part!r} is not a number of steps") from None
    if not budgets:
        raise AhmError(f"{option}: give at least one budget, e.g. 1000,3000,10000")
    for before, after in zip([0] + budgets, budgets):
        if after <= before:
            raise AhmError(f"{option} {','.join(map(str, budgets))}: budgets must be positive and "
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


def corpus_names(data: str | Path, corpora: list[str | Path] | None) -> list[tuple[str, Path]]:
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
              seeds: int, pretrain_steps: int | list[int], finetune_steps: int, corpora: list[str | Path] | None = None,
              base_config: str | Path | None = None, overrides: dict[str, Any] | None = None,
              split: str = "test", first_seed: int = 0, log: Callable[[str], None] | None = None,
              finetune_epochs: int | None = None, spatial_dims: int | None = None,
              gather: bool = False, pretrain_epochs: int | None = None,
              protocols: list[str] | None = None, run_steps: list[int] | None = None) -> dict[str, Any]:
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
    these settings; a grid folder run with others is refused (`check_settings`). `run_steps`: of the budget axis,
    run only the pretrained cells at these budgets (and the scratch cells, which every point pairs with), e.g. more
    seeds at the budget that decides; the others are left for another call, counted as missing, and the tables
    cover every finished cell as with `gather`."""
    from ahm.models.backbones import get_backbone

    check_grid(policies, backbones, seeds, first_seed)
    budgets = parse_budgets(",".join(map(str, [pretrain_steps] if isinstance(pretrain_steps, int) else pretrain_steps)))
    axis = len(budgets) > 1
    if axis and pretrain_epochs is not None:
        raise AhmError(f"--pretrain-steps {','.join(map(str, budgets))} with --pretrain-epochs: each point's budget "
                       "would be either; give a list of step budgets, or one floor with --pretrain-epochs")
    protocols = parse_protocols(",".join(protocols or ["finetune"]))
    if run_steps is not None:
        run_steps = parse_budgets(",".join(map(str, run_steps)), option="--run-steps")
        if not axis:
            raise AhmError(f"--run-steps {','.join(map(str, run_steps))}: needs a budget axis (several "
                           "--pretrain-steps) to choose from")
        if not set(run_steps) <= set(budgets):
            raise AhmError(f"--run-steps {','.join(map(str, run_steps))}: not on the --pretrain-steps axis "
                           f"{','.join(map(str, budgets))}")
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
            kept = json.loads(done.read_text())
            if (policy != "scratch" and not {"hardness_ratio", "pretrain_steps"} <= set(kept)
                    and (pre_dir / "summary.json").is_file()):
                # a cell finished before these figures were recorded: its pretraining run has them
                kept.update(pretrain_figures(json.loads((pre_dir / "summary.json").read_text())))
            rows.append(kept)
            say(f"[{k}/{len(cells)}] {cell_dir.name}: done earlier, kept")
            continue
        if gather or (run_steps is not None and steps is not None and steps not in run_steps):
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
    elif missing:
        say(f"--run-steps {','.join(map(str, run_steps or []))}: {len(missing)} cells at other budgets not run "
            f"(first: {missing[0]})")
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
