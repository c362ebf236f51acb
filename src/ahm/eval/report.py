"""A self-contained HTML report of a fine-tuning run (every image embedded as base64, no external files).

Sections: summary, learning curves, metric tables of every evaluated split, best and worst cases with overlays,
and, when the encoder was pretrained with the AHM policy, the agent's masks on a few images.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from ahm.eval.render import cases_png, html_value, img_tag, learning_curves_png, metric_table
from ahm.io import read_jsonl, write_text

SPLIT_ORDER = ("test", "val", "train", "all")


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _agent_panels(init_dir: Path, cache: Path, n_images: int = 3) -> list[bytes]:
    """Panels of the agent's masks drawn by ahm.eval.visualize for a few held-out images, cached in `cache`.

    Empty when that module is absent or the pretraining run cannot be replayed (its data moved, say).
    """
    if cache.is_dir():
        found = sorted(p for p in cache.glob("*.png"))
        if found:
            return [p.read_bytes() for p in found]
    try:
        from ahm.eval.visualize import visualize_run
    except ImportError:
        return []
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".agent-", dir=cache.parent))
    try:
        written = visualize_run(init_dir, None, tmp, n_images=n_images)
        panels = [p for p in written if p.suffix == ".png"]
        if not panels:
            return []
        if cache.exists():
            shutil.rmtree(cache)
        tmp.rename(cache)
        return [(cache / p.name).read_bytes() for p in panels]
    except Exception:  # noqa: BLE001  (a figure must never break the report)
        return []
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _agent_section(init_dir: Path | None, run_dir: Path) -> str | None:
    """The masks the AHM agent chooses: ahm.eval.visualize's panels, else the pretraining run's own figure."""
    if init_dir is None or not init_dir.is_dir():
        return None
    pngs = _agent_panels(init_dir, run_dir / "agent_masks")
    if not pngs:
        fallback = init_dir / "reconstructions.png"
        pngs = [fallback.read_bytes()] if fallback.is_file() else []
    if not pngs:
        return None
    return ("<h2>Masks chosen by the AHM agent</h2><p>What the pretraining agent masks on a few images, from the "
            f"run in <code>{html.escape(str(init_dir))}</code>.</p>"
            + "".join(img_tag(png, "agent masks") for png in pngs))


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.mean{font-weight:bold}img{max-width:100%}
code{background:#f4f4f4;padding:1px 4px}.note{color:#666;font-size:0.9em}"""


def write_report(run_dir: str | Path) -> Path:
    """Write (or refresh) `report.html` in a fine-tuning run directory; returns its path."""
    from ahm.pipeline import for_dims

    run_dir = Path(run_dir)
    summary = _load_json(run_dir / "summary.json") or {}
    run_info = _load_json(run_dir / "run.json") or {}
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>ahm report: {html.escape(run_dir.name)}</title>"
              f"<style>{_CSS}</style></head><body><h1>Segmentation report: {html.escape(run_dir.name)}</h1>")]
    facts = [("segmenter", summary.get("segmenter")), ("encoder", summary.get("init")),
             ("pretraining policy", summary.get("init_policy")), ("labels fraction", summary.get("labels_fraction")),
             ("labelled subjects / images", f"{summary.get('labelled_subjects', '?')} / {summary.get('labelled_images', '?')}"),
             ("classes", summary.get("num_classes")), ("epochs", summary.get("epochs")),
             ("best validation Dice", summary.get("best_val_dice")), ("best epoch", summary.get("best_epoch")),
             ("seed", summary.get("seed", run_info.get("seed"))), ("version", run_info.get("version"))]
    parts.append("<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html_value(v)}</td></tr>"
                                     for k, v in facts if v is not None) + "</table>")
    if not summary:
        parts.append("<p class='note'>The run has not finished yet (no summary.json).</p>")

    curves = learning_curves_png(read_jsonl(Path(run_dir) / "metrics.jsonl"))
    if curves:
        parts.append("<h2>Learning curves</h2>" + img_tag(curves, "learning curves"))

    eval_root = run_dir / "eval"
    splits = sorted((p for p in eval_root.iterdir() if (p / "metrics.json").is_file()),
                    key=lambda p: (SPLIT_ORDER.index(p.name) if p.name in SPLIT_ORDER else 99, p.name)) \
        if eval_root.is_dir() else []
    shown_cases: dict[str, np.ndarray] | None = None
    for split_dir in splits:
        metrics = _load_json(split_dir / "metrics.json")
        if not metrics:
            continue
        pipeline = for_dims(metrics.get("spatial_dims", 2))  # a 2D metrics.json does not record it
        parts.append(f"<h2>Metrics: {html.escape(split_dir.name)} split ({metrics.get('n_images', '?')} "
                     f"{pipeline.case_noun}s)</h2>")
        levels = list(pipeline.report_levels)
        if metrics.get("level") != "volume":
            levels.reverse()
        shown = False
        for key, what in levels:
            level = metrics.get(key)
            if level:
                parts.append(f"<h3>Each case one of the {level.get('n_cases', '?')} {what}"
                             f"{' (primary)' if not shown else ''}</h3>" + metric_table(level))
                shown = True
        if not shown:  # a metrics.json from before the levels existed
            parts.append(metric_table(metrics))
        parts.append(f"<p class='note'>Computed on the {html.escape(str(metrics.get('grid', 'model grid')))}; "
                     f"HD95 in {html.escape(str(metrics.get('hd95_unit', 'pixels')))}. Empty masks: "
                     f"{html.escape(str(metrics.get('empty_masks', '')))}. Per-{pipeline.case_noun} "
                     f"figures: <code>eval/{html.escape(split_dir.name)}/"
                     f"{html.escape(str(metrics.get('per_case_csv', 'per_image.csv')))}</code>.</p>")
        if shown_cases is None and (split_dir / "cases.npz").is_file():
            try:
                with np.load(split_dir / "cases.npz", allow_pickle=False) as npz:
                    shown_cases = {k: npz[k] for k in npz.files}
            except (OSError, ValueError):
                shown_cases = None
            png = cases_png(shown_cases) if shown_cases else None
            if png:
                parts.append(f"<h2>Best and worst cases ({html.escape(split_dir.name)})</h2>"
                             "<p class='note'>Among images with a structure to find, ranked by mean Dice.</p>"
                             + img_tag(png, "cases"))
    if not splits:
        parts.append("<p class='note'>No evaluation yet: run <code>ahm evaluate</code>.</p>")

    init = summary.get("init")
    if summary.get("init_policy") == "ahm" and init and init != "none":
        section = _agent_section(Path(init), run_dir)
        if section:
            parts.append(section)
    parts.append("</body></html>")
    return write_text(run_dir / "report.html", "\n".join(parts))
