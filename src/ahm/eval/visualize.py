"""Seeing what the masking agent learned: per-image panels from a pretraining run, and its diagnostics over time.

`visualize_run` reads a run directory written by `ahm pretrain` (config.yaml, checkpoints/last.ckpt,
metrics.jsonl), rebuilds the MIM model and the masking policy from the checkpoint, and draws for a few
held-out images: the image, the actor's draw probability, the critic's predicted loss, the mask it draws
(actor-chosen patches red, random ones blue), the true per-patch loss and the reconstruction. A volume (3D run)
is drawn as three rows: the orthogonal slices through its centre.
"""

from __future__ import annotations

import io as _io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ahm.errors import AhmError
from ahm.io import load_torch, read_jsonl, restore_state, write_bytes

DIAGNOSTIC_KEYS = ("loss", "hardness_ratio", "critic_spearman", "policy_entropy", "mean_reward", "background_share",
                   "background_share_actor", "hard_fraction", "agent_loss", "transitions_dropped")

if TYPE_CHECKING:
    from ahm.grid import PatchGrid


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> Path:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return write_bytes(path, buf.getvalue())


def _display(image: np.ndarray) -> np.ndarray:
    """[C, H, W] -> something imshow draws: [H, W] grey or [H, W, 3] RGB, clipped to [0, 1]."""
    image = np.clip(image, 0.0, 1.0)
    return image[0] if image.shape[0] != 3 else np.transpose(image, (1, 2, 0))


def _upsample(grid_values: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Per-patch values [L] -> every pixel (voxel) of its patch: [*spatial]."""
    return grid.upsample(torch.from_numpy(np.ascontiguousarray(grid_values))[None])[0, 0].numpy()


def _mask_overlay(image: np.ndarray, random_px: np.ndarray, hard_px: np.ndarray) -> np.ndarray:
    """[C, H, W] image tinted blue where `random_px` and red where `hard_px` ([H, W] 0/1 maps)."""
    grey = image.mean(axis=0) if image.shape[0] != 3 else None
    rgb = np.stack([grey] * 3, axis=-1) if grey is not None else np.transpose(image, (1, 2, 0)).copy()
    rgb = np.clip(rgb, 0.0, 1.0)
    random_px, hard_px = random_px[..., None], hard_px[..., None]
    rgb = rgb * (1 - 0.55 * random_px) + 0.55 * random_px * np.array([0.2, 0.45, 1.0])
    rgb = rgb * (1 - 0.55 * hard_px) + 0.55 * hard_px * np.array([1.0, 0.15, 0.1])
    return rgb


def sample_figure(
    title: str,
    grid: PatchGrid,
    image: np.ndarray,
    mask: np.ndarray,
    hard: np.ndarray,
    per_patch_loss: np.ndarray,
    prediction: np.ndarray,
    maps: tuple[np.ndarray, np.ndarray] | None = None,
) -> Any:
    """The panels of one image ([C, H, W]) or volume ([C, D, H, W]; one row per orthogonal centre slice).

    `mask`, `hard` (bool) and `per_patch_loss`, and the agent's `maps` (draw probability, predicted loss), hold one
    value per patch of `grid`; `prediction` is the model's reconstruction, shaped like `image`.
    """
    from ahm.pipeline import for_dims

    per_pixel: list[tuple[str, np.ndarray, dict[str, Any]]] = []
    if maps is not None:
        per_pixel.append(("actor probability", _upsample(maps[0], grid), {"cmap": "magma"}))
        per_pixel.append(("critic predicted loss", _upsample(maps[1], grid), {"cmap": "viridis"}))
    random_px = _upsample((mask & ~hard).astype(np.float32), grid)
    hard_px = _upsample(hard.astype(np.float32), grid)
    true_loss = _upsample(np.where(mask, per_patch_loss.astype(np.float32), np.nan), grid)
    views = for_dims(grid.spatial_dims).drawn_views(grid.spatial_shape)
    plt = _pyplot()
    cols = 3 + len(per_pixel) + 1
    fig, axes = plt.subplots(len(views), cols, figsize=(2.6 * cols, 2.9 * len(views)), squeeze=False)
    for row, (view_name, index) in zip(axes, views):
        picture = image[(slice(None), *index)]
        base = _display(picture)
        panels: list[tuple[str, Any, dict[str, Any]]] = [("image", base, {})]
        panels += [(name, values[index], style) for name, values, style in per_pixel]
        panels.append(("mask (red actor, blue random)", _mask_overlay(picture, random_px[index], hard_px[index]), {}))
        panels.append(("true loss (masked)", true_loss[index], {"cmap": "viridis"}))
        panels.append(("reconstruction", _display(prediction[(slice(None), *index)]), {}))
        for ax, (name, array, style) in zip(row, panels):
            if array.ndim == 2 and "cmap" in style:
                ax.imshow(base, cmap="gray", vmin=0, vmax=1) if base.ndim == 2 else ax.imshow(base)
                ax.imshow(array, alpha=0.7, interpolation="nearest", **style)
            elif array.ndim == 2:
                ax.imshow(array, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(array)
            ax.set_title(f"{name} ({view_name})" if view_name else name, fontsize=8)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return fig


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The records of a metrics.jsonl file (unreadable lines skipped: a run may have been cut mid-line)."""
    return [r for r in read_jsonl(path) if isinstance(r, dict) and "step" in r]


def plot_diagnostics(metrics_path: Path, out_path: Path) -> Path | None:
    """diagnostics.png: each logged diagnostic over training steps; None if nothing was logged."""
    records = read_metrics(metrics_path)
    keys = [k for k in DIAGNOSTIC_KEYS if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not keys:
        return None
    plt = _pyplot()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.4)
        if key == "hardness_ratio":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")  # 1 = no better than random masking
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    fig.tight_layout()
    return _save_figure(fig, out_path)


def find_recorded(recorded: str | None, run_dir: Path) -> Path | None:
    """A path a run recorded, where it is now: as given, or beside the run (a relative path may be relative to
    where the run was started); None when neither exists."""
    if not recorded:
        return None
    for candidate in (Path(recorded), run_dir.parent / recorded):
        if candidate.exists():
            return candidate
    return None


def _recorded_data(recorded: str | None, run_dir: Path) -> Path:
    """The dataset a run recorded, or AhmError asking for --data."""
    if not recorded:
        raise AhmError(f"--data: {run_dir} does not record its dataset; give the folder with --data")
    found = find_recorded(recorded, run_dir)
    if found is None:
        raise AhmError(f"--data: the run's dataset {recorded} is not found from here; give the folder with --data")
    return found


def load_run(run_dir: Path, data_dir: Path | None, n_images: int | None,
             split: str | None = None) -> tuple[Any, Any, Any, Any]:
    """(config, model, policy, arrays) of a pretraining run, with `n_images` held-out images (None: all of them;
    for a 3D run the centre crops of held-out volumes, at the training crop the model was built for): of `split`,
    or of the first of val, test and train that has any."""
    from ahm.config import PretrainConfig, load_config
    from ahm.data import make_splits, open_dataset
    from ahm.masking.base import PolicyContext, build_policy
    from ahm.models import build_mim_model
    from ahm.pipeline import pipeline_for
    from ahm.runformat import run_file

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise AhmError(f"{run_dir}: not a pretraining run directory (no config.yaml)")
    cfg = load_config(PretrainConfig, config_path)
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = load_torch(run_file(run_dir, "checkpoints/last.ckpt"))
    if not isinstance(ckpt, dict) or "model" not in ckpt or "policy" not in ckpt:
        raise AhmError(f"{ckpt_path}: not an ahm pretraining checkpoint (no model or policy weights)")
    data_path = data_dir if data_dir is not None else _recorded_data(cfg.data.path, run_dir)
    data_cfg = cfg.data.model_copy(update={"path": str(data_path)})
    index = open_dataset(data_path, data_cfg)
    splits = make_splits(index, data_cfg)
    if split is not None:
        ids = list(splits.get(split) or [])
        if not ids:
            raise AhmError(f"--split {split}: {data_path} has no {split} images")
    else:
        ids = list(splits.get("val") or splits.get("test") or splits.get("train") or [])
        if not ids:
            raise AhmError(f"{data_path}: no images to visualise")
    ids = ids if n_images is None else ids[:max(1, n_images)]
    pipeline = pipeline_for(data_cfg)
    arrays = pipeline.drawn_samples(index, ids, data_cfg)
    in_channels = int(arrays.images.shape[1])
    model = build_mim_model(cfg.model, pipeline.model_input_size(cfg.data), in_channels,
                            spatial_dims=cfg.data.spatial_dims)
    restore_state(model, ckpt["model"], "model (or --data's channel count)", ckpt_path)
    model.eval()
    # no A3C workers for looking: the agent's weights are the same in both modes
    masking = cfg.masking.model_copy(update={"agent_workers": 0})
    ctx = PolicyContext(grid=model.patch_grid, in_channels=in_channels,
                        total_steps=int(ckpt.get("step") or cfg.train.steps or 1), seed=cfg.train.seed, model=model)
    policy = build_policy(masking, ctx)
    restore_state(policy, ckpt["policy"], "masking policy", ckpt_path)
    policy.eval()
    return cfg, model, policy, arrays


@torch.no_grad()
def visualize_run(run_dir: str | Path, data_dir: str | Path | None, out_dir: str | Path, n_images: int = 8) -> list[Path]:
    """Write <id>.png panels for `n_images` held-out images and diagnostics.png; returns the files written."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir)
    if n_images < 1:
        raise AhmError(f"--n-images must be at least 1, got {n_images}")
    cfg, model, policy, arrays = load_run(run_dir, Path(data_dir) if data_dir is not None else None, n_images)
    images = torch.from_numpy(np.ascontiguousarray(arrays.images)).float()
    grid = model.patch_grid
    try:
        mask = policy.propose(images, 1.0)  # the end of the schedules: the hard fraction the run ended at
        hard_idx = getattr(policy, "last_hard_indices", None)
        hard = torch.zeros_like(mask)
        if hard_idx is not None and hard_idx.numel():
            hard.scatter_(1, hard_idx.to(mask.device), True)
        maps = policy.agent_maps(images) if hasattr(policy, "agent_maps") else None
        out = model(images, mask)
    finally:
        policy.close()
    written: list[Path] = []
    for i, item_id in enumerate(arrays.ids):
        title = (f"{item_id}  ({cfg.masking.policy}, {int(mask[i].sum())}/{mask.shape[1]} masked, "
                 f"{int(hard[i].sum())} by the actor)")
        fig = sample_figure(title, grid, arrays.images[i], mask[i].numpy(), hard[i].numpy(),
                            out.per_patch_loss[i].float().numpy(), out.prediction[i].float().numpy(),
                            None if maps is None else (maps[0][i].numpy(), maps[1][i].numpy()))
        written.append(_save_figure(fig, out_dir / f"{item_id}.png"))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        diag = plot_diagnostics(metrics, out_dir / "diagnostics.png")
        if diag is not None:
            written.append(diag)
    return written
