"""`ahm bench curve` statistics: means over seeds per grid point, and the paired comparisons and trend tests
across policies, corpora and pretraining budgets, on the rows of finished cells (`bench compare`'s exact
sign-flip p throughout).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ahm.bench.compare import _mean_std, hd95_values, paired_differences, paired_entry, paired_stats

SAME = "data"  # the corpus name of "pretrain on the labelled set's own training subjects"


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


CONTROL_ALPHA = 0.05  # the exact sign-flip p the gain must reach
CONTROL_SEEDS = 6  # paired seeds the deciding point needs


def _verdict_key(e: dict[str, Any]) -> tuple:
    return (e["backbone"], e["protocol"], e["corpus"], e.get("pretrain_budget"), str(e["labels"]))


def control_verdict(rows: list[dict[str, Any]], policy: str = "random", target: float = TARGET_GAIN,
                    alpha: float = CONTROL_ALPHA, min_seeds: int = CONTROL_SEEDS) -> dict[str, Any] | None:
    """The positive control on the rows of finished cells: does `policy` beat scratch somewhere?

    The deciding point (backbone, protocol, corpus, budget, labels) is the one with the largest paired
    *validation* gain over scratch, measured on the seeds that every candidate point has (so that running more
    seeds at one point, as the verdict asks, does not change which point is chosen; while no seed has every point,
    on each point's own seeds, and the verdict is `provisional`). Its *test* gain over all its paired seeds
    decides: at least `target` with the exact sign-flip p at most `alpha` over at least `min_seeds` seeds (fewer:
    `provisional`, and `needs_seeds` says how many more that point needs). Choosing on validation and judging on
    test keeps the choice among many points from inflating the reported gain. None when `policy` never pairs with
    scratch."""
    def finite(v: Any) -> bool:
        return v is not None and math.isfinite(v)  # a mean over no pairs is NaN

    def candidates(some: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
        return {_verdict_key(e): e for e in paired_by_point(some) if e["policy"] == policy
                and e["reference"] == "scratch" and finite(e.get("val_dice")) and finite(e.get("dice"))}

    mine = candidates(rows)
    if not mine:
        return None
    seeds = sorted({r["seed"] for r in rows})
    common = [s for s in seeds if set(mine) <= set(candidates([r for r in rows if r["seed"] == s]))]
    chooser = candidates([r for r in rows if r["seed"] in common]) if common else mine
    key = max(chooser, key=lambda k: chooser[k]["val_dice"])
    chosen = mine[key]
    n = chosen["dice_n"]
    provisional = not common or n < min_seeds
    succeeded = not provisional and chosen["dice"] >= target and chosen["dice_p"] <= alpha
    return {"policy": policy, "point": {k: chosen.get(k) for k in ("backbone", "protocol", "corpus",
                                                                   "pretrain_budget", "labels")},
            "entry": chosen, "choice_seeds": common, "choice_val_dice": chooser[key]["val_dice"],
            "points": len(mine), "provisional": provisional, "needs_seeds": max(0, min_seeds - n),
            "succeeded": succeeded, "target": target, "alpha": alpha, "min_seeds": min_seeds}


def verdict_line(v: dict[str, Any], split: str) -> str:
    """`control_verdict` in one sentence."""
    e, p = v["entry"], v["point"]
    budget = f"{p['pretrain_budget']} pretraining steps on" if p["pretrain_budget"] else "pretrained on"
    where = f"{p['backbone']}, {p['protocol']} protocol, {budget} {p['corpus']}, {p['labels']} labelled subject(s)"
    n = e["dice_n"]
    figures = (f"{v['policy']} - scratch {e['dice']:+.4f} +- {e['dice_std']:.4f} {split} Dice over {n} paired "
               f"seeds ({e['dice_ahead']}/{n} ahead, p {e['dice_p']:.3f}; val {e['val_dice']:+.4f})")
    chosen = (f"chosen on validation among {v['points']} points over seeds "
              f"{', '.join(map(str, v['choice_seeds']))}, the seeds every point has" if v["choice_seeds"] else
              f"the best of {v['points']} points on validation, each on its own seeds (no seed has every point yet)")
    if v["provisional"]:
        more = f"; it needs {v['needs_seeds']} more paired seeds" if v["needs_seeds"] else ""
        return f"Positive control: no verdict yet. The point {chosen}: {where}{more}: {figures}."
    outcome = ("succeeds" if v["succeeded"] else
               f"does not succeed (needs at least +{v['target']:g} with p <= {v['alpha']:g})")
    return f"Positive control {outcome}: at the point {chosen} ({where}), {figures}."


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
