"""Rendering of evaluation results: overlays, report figures, metric tables (HTML) and per-case CSV.

Pure functions of arrays and metric dicts, importing nothing of `ahm.eval`: scoring (`evaluate`), inference
(`predict`) and the report all draw with them, so imports among those run one way and never in a circle.
Matplotlib is imported on first drawing, not with this module.
"""

from __future__ import annotations

import base64
import csv
import html
import io as _io
from typing import Any

import numpy as np

from ahm.eval.metrics import METRICS

PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)], dtype=np.float32)



def overlay_rgb(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB [H, W, 3]: a [C, H, W] image in [0, 1] with each foreground class tinted its palette colour."""
    base = image[0] if image.shape[0] != 3 else None
    rgb = np.repeat(base[..., None], 3, axis=2) if base is not None else np.moveaxis(image, 0, -1)
    rgb = np.clip(rgb, 0.0, 1.0) * 255.0
    for c in np.unique(mask):
        if c == 0:
            continue
        sel = mask == c
        rgb[sel] = (1 - alpha) * rgb[sel] + alpha * PALETTE[(int(c) - 1) % len(PALETTE)]
    return rgb.astype(np.uint8)


def display_slice(image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """The axial slice (last axis) with the most ground-truth foreground (else prediction, else the centre), the
    image scaled to [0, 1] per volume for display: what the report draws of one volume."""
    fg = (label > 0).reshape(-1, label.shape[-1]).sum(0)
    if not fg.any():
        fg = (pred > 0).reshape(-1, pred.shape[-1]).sum(0)
    z = int(np.argmax(fg)) if fg.any() else label.shape[-1] // 2
    img = image[..., z].astype(np.float32)
    lo, hi = float(img.min(initial=0.0)), float(img.max(initial=0.0))
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return {"image": img, "label": label[..., z], "pred": pred[..., z], "slice": z}


def _fig_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves_png(records: list[dict[str, Any]]) -> bytes | None:
    """Training loss, validation Dice and learning rate against the step."""
    train = [r for r in records if "loss" in r and "step" in r]
    val = [r for r in records if r.get("val_dice") is not None and "step" in r]
    if not train and not val:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2,
                     marker="o" if len(train) < 20 else None, ms=3)
    axes[0].set(title="training loss (Dice + CE)", xlabel="step")
    if val:
        axes[1].plot([r["step"] for r in val], [r["val_dice"] for r in val], marker="o", ms=3, color="tab:green")
        best = max(val, key=lambda r: r["val_dice"])
        axes[1].axhline(best["val_dice"], ls=":", color="grey")
    axes[1].set(title="validation mean foreground Dice", xlabel="step", ylim=(0, 1))
    lr = [r for r in records if "lr" in r and "step" in r]
    if lr:
        axes[2].plot([r["step"] for r in lr], [r["lr"] for r in lr], color="tab:orange")
    axes[2].set(title="learning rate", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _fig_png(fig)


def cases_png(cases: dict[str, np.ndarray]) -> bytes | None:
    """One row per case: the image, the ground truth and the prediction as overlays."""
    n = len(cases.get("ids", []))
    if n == 0:
        return None
    plt = _plt()
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        image = np.clip(cases["images"][i], 0, 1)
        shown = image[0] if image.shape[0] != 3 else np.moveaxis(image, 0, -1)
        panels = [(shown, "image"), (overlay_rgb(image, cases["labels"][i]), "ground truth"),
                  (overlay_rgb(image, cases["preds"][i]), "prediction")]
        for ax, (im, title) in zip(axes[i], panels):
            ax.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=1 if im.ndim == 2 else None)
            ax.set_axis_off()
            ax.set_title(title if i == 0 else "", fontsize=9)
        axes[i][0].text(0, -4, f"{cases['kind'][i]}: {cases['ids'][i]}  Dice {cases['dice'][i]:.3f}", fontsize=8)
    fig.tight_layout()
    return _fig_png(fig)


def html_value(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def metric_table(metrics: dict[str, Any]) -> str:
    rows = ["<tr><th>class</th><th>Dice (per case)</th><th>Dice (dataset)</th><th>IoU (per case)</th><th>HD95</th>"
            "<th>missed / present</th><th>false detections / absent</th><th>excluded (empty in both)</th></tr>"]
    for name, vals in (metrics.get("per_class") or {}).items():
        missed = f"{vals['missed']} / {vals['present']}" if "missed" in vals else "–"
        false = f"{vals['false_detections']} / {vals['absent']}" if "false_detections" in vals else "–"
        rows.append(f"<tr><td>{html.escape(str(name))}</td><td>{html_value(vals.get('dice'))}</td>"
                    f"<td>{html_value(vals.get('dataset_dice'))}</td><td>{html_value(vals.get('iou'))}</td>"
                    f"<td>{html_value(vals.get('hd95'), 2)}</td><td>{missed}</td><td>{false}</td>"
                    f"<td>{html_value(vals.get('excluded_empty'))}</td></tr>")
    rows.append(f"<tr class='mean'><td>mean</td><td>{html_value(metrics.get('dice'))}</td>"
                f"<td>{html_value(metrics.get('dataset_dice'))}</td><td>{html_value(metrics.get('iou'))}</td>"
                f"<td>{html_value(metrics.get('hd95'), 2)}</td><td></td><td></td><td></td></tr>")
    return "<table>" + "".join(rows) + "</table>"




def _csv_name(name: str) -> str:
    return "_".join(name.split()) or "class"


def _cases_csv(lead: list[str], leads: list[list], per_case, means, names) -> str:
    """One row per case: its `lead` columns, then every metric per class, then the means over classes."""
    buf = _io.StringIO()
    writer = csv.writer(buf)
    header = list(lead)
    for name in names:
        header += [f"{m}_{_csv_name(name)}" for m in METRICS]
    header += [f"{m}_mean" for m in METRICS]
    writer.writerow(header)
    for row, values in enumerate(leads):
        values = list(values)
        for c in range(len(names)):
            values += [_csv_number(per_case[m][row, c]) for m in METRICS]
        values += [_csv_number(means[m][row]) for m in METRICS]
        writer.writerow(values)
    return buf.getvalue()


def per_image_csv(ids, items, per_case, means, names) -> str:
    leads = []
    for row, item_id in enumerate(ids):
        item = items[row] if items is not None else None
        leads.append([item_id, getattr(item, "subject", ""), getattr(item, "volume", "") or "",
                      "" if getattr(item, "slice", None) is None else item.slice])
    return _cases_csv(["id", "subject", "volume", "slice"], leads, per_case, means, names)


def _csv_number(v: float) -> str:
    return "" if not np.isfinite(v) else f"{float(v):.6g}"


def per_volume_csv(ids, subjects, shapes, spacings, per_case, means, names) -> str:
    leads = [[item_id, subjects[row], "x".join(map(str, shapes[row])), "x".join(f"{s:.6g}" for s in spacings[row])]
             for row, item_id in enumerate(ids)]
    return _cases_csv(["id", "subject", "shape", "spacing_mm"], leads, per_case, means, names)
