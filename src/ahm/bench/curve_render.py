"""`ahm bench curve` output: results.csv, results.md (tables of points, floors, pairings and trends) and
results.png (Dice against each grid axis), from the rows of finished cells and `curve_stats`' figures.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ahm.bench.compare import _f, below_floors, floors
from ahm.bench.curve_stats import (
    TARGET_GAIN,
    budget_trend,
    control_verdict,
    corpus_trend,
    paired_by_corpus,
    protocol,
    verdict_line,
)
from ahm.io import write_bytes, write_text

COLUMNS = ["backbone", "protocol", "policy", "pretrain_budget", "corpus", "corpus_subjects", "labels", "labelled_subjects", "seed", "dice",
           "dataset_dice", "iou", "hd95", "hd95_unit", "val_dice", "selection", "empty_cases", "pretrain_steps",
           "pretrain_final_loss", "hardness_ratio", "critic_spearman", "pretrain_s", "finetune_s"]
PROTOCOL_TEXT = {"finetune": "finetune (every weight trains)",
                 "frozen": "frozen (only the new layers train; scratch: a random frozen encoder)"}


def _fmt(value: float, std: float, digits: int = 4) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f} +- {std:.{digits}f}"


def write_results(out: Path, rows: list[dict[str, Any]], table: list[dict[str, Any]], paired: list[dict[str, Any]],
                  split: str, baselines: dict[str, dict[str, Any]] | None = None, missing: int = 0) -> None:
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
             + (f" **Partial: {len(rows)} of {len(rows) + missing} cells finished** (the others still to run; "
                "`n` is the seeds finished per point, pairs only seeds finished in both arms)."
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
    verdict = control_verdict(rows)
    if verdict is not None:  # the answer a positive-control grid exists for, above its tables
        lines[:0] = [verdict_line(verdict, split), ""]
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
            extra: tuple = (), policies: set | None = None) -> None:
    """Two keys under the panel: the colours of its policies (default: all) and the line styles of `kind` (corpus
    or labels) named in `names`."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linewidth=2, label=p + (f" [{b}]" if multi_backbone else ""))
               for (b, p), c in styles["colour"].items() if policies is None or (b, p) in policies]
    handles += [Line2D([], [], color="0.35", label=names.get(k, k), **look)
                for k, look in styles[kind].items() if k in names] + list(extra)
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)


def _plot(path: Path, table: list[dict[str, Any]], split: str,
          baselines: dict[str, dict[str, Any]] | None = None, rows: list[dict[str, Any]] | None = None,
          by_corpus: list[dict[str, Any]] | None = None) -> None:
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
