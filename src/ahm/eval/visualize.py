"""Seeing what the masking agent learned: per-image panels from a pretraining run, and its diagnostics over time.

`visualize_run` reads a run directory written by `ahm pretrain` (config.yaml, checkpoints/last.ckpt,
metrics.jsonl), rebuilds the MIM model and the masking policy from the checkpoint, and draws for a few
held-out images: the image, the actor's draw probability, the critic's predicted loss, the mask it draws
(actor-chosen patches red, random ones blue), the true per-patch loss and the reconstruction.
"""

from __future__ import annotations

import io as _io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ahm.errors import AhmError
from ahm.io import load_torch, read_jsonl, restore_state, write_bytes

DIAGNOSTIC_KEYS = ("loss", "hardness_ratio", "critic_spearman", "policy_entropy", "mean_reward", "background_share",
                   "background_share_actor", "hard_fraction", "agent_loss", "transitions_dropped")


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


def _upsample(grid_values: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    return np.kron(grid_values.reshape(grid), np.ones((patch, patch), dtype=grid_values.dtype))


def _mask_overlay(image: np.ndarray, mask: np.ndarray, hard: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    grey = image.mean(axis=0) if image.shape[0] != 3 else None
    rgb = np.stack([grey] * 3, axis=-1) if grey is not None else np.transpose(image, (1, 2, 0)).copy()
    rgb = np.clip(rgb, 0.0, 1.0)
    random_px = _upsample((mask & ~hard).astype(np.float32), grid, patch)[..., None]
    hard_px = _upsample(hard.astype(np.float32), grid, patch)[..., None]
    rgb = rgb * (1 - 0.55 * random_px) + 0.55 * random_px * np.array([0.2, 0.45, 1.0])
    rgb = rgb * (1 - 0.55 * hard_px) + 0.55 * hard_px * np.array([1.0, 0.15, 0.1])
    return rgb


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


def _recorded_data(recorded: str | None, run_dir: Path) -> Path:
    """The dataset a run recorded; a relative path may be relative to where the run was started."""
    if not recorded:
        raise AhmError(f"--data: {run_dir} does not record its dataset; give the folder with --data")
    path = Path(recorded)
    for candidate in (path, run_dir.parent / path):
        if candidate.exists():
            return candidate
    raise AhmError(f"--data: the run's dataset {recorded} is not found from here; give the folder with --data")


def load_run(run_dir: Path, data_dir: Path | None, n_images: int) -> tuple[Any, Any, Any, Any]:
    """(config, model, policy, arrays) of a pretraining run, with `n_images` held-out images."""
    from ahm.config import PretrainConfig, load_config
    from ahm.data import load_arrays, make_splits, open_dataset
    from ahm.masking.base import PolicyContext, build_policy
    from ahm.models import build_mim_model

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise AhmError(f"{run_dir}: not a pretraining run directory (no config.yaml)")
    cfg = load_config(PretrainConfig, config_path)
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = load_torch(ckpt_path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "policy" not in ckpt:
        raise AhmError(f"{ckpt_path}: not an ahm pretraining checkpoint (no model or policy weights)")
    data_path = data_dir if data_dir is not None else _recorded_data(cfg.data.path, run_dir)
    data_cfg = cfg.data.model_copy(update={"path": str(data_path)})
    index = open_dataset(data_path, data_cfg)
    splits = make_splits(index, data_cfg)
    ids = (splits.get("val") or splits.get("test") or splits.get("train") or [])[:max(1, n_images)]
    if not ids:
        raise AhmError(f"{data_path}: no images to visualise")
    arrays = load_arrays(index, ids, data_cfg, labels=False)
    in_channels = int(arrays.images.shape[1])
    model = build_mim_model(cfg.model, cfg.data.image_size, in_channels)
    restore_state(model, ckpt["model"], "model (or --data's channel count)", ckpt_path)
    model.eval()
    # no A3C workers for looking: the agent's weights are the same in both modes
    masking = cfg.masking.model_copy(update={"agent_workers": 0})
    ctx = PolicyContext(grid=model.grid, patch_size=model.patch_size, in_channels=in_channels,
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
    grid, patch = model.grid, model.patch_size
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
    plt = _pyplot()
    written: list[Path] = []
    for i, item_id in enumerate(arrays.ids):
        image = arrays.images[i]
        panels: list[tuple[str, Any, dict[str, Any]]] = [("image", _display(image), {})]
        base = _display(image)
        if maps is not None:
            probs, values = maps
            panels.append(("actor probability", _upsample(probs[i].numpy(), grid, patch), {"cmap": "magma"}))
            panels.append(("critic predicted loss", _upsample(values[i].numpy(), grid, patch), {"cmap": "viridis"}))
        panels.append(("mask (red actor, blue random)",
                       _mask_overlay(image, mask[i].numpy(), hard[i].numpy(), grid, patch), {}))
        true_loss = np.where(mask[i].numpy(), out.per_patch_loss[i].float().numpy(), np.nan)
        panels.append(("true loss (masked)", _upsample(true_loss, grid, patch), {"cmap": "viridis"}))
        panels.append(("reconstruction", _display(out.prediction[i].float().numpy()), {}))
        fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9), squeeze=False)
        for ax, (title, array, style) in zip(axes[0], panels):
            if array.ndim == 2 and "cmap" in style:
                ax.imshow(base, cmap="gray", vmin=0, vmax=1) if base.ndim == 2 else ax.imshow(base)
                ax.imshow(array, alpha=0.7, interpolation="nearest", **style)
            elif array.ndim == 2:
                ax.imshow(array, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(array)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
        fig.suptitle(f"{item_id}  ({cfg.masking.policy}, {int(mask[i].sum())}/{mask.shape[1]} masked, "
                     f"{int(hard[i].sum())} by the actor)", fontsize=9)
        written.append(_save_figure(fig, out_dir / f"{item_id}.png"))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        diag = plot_diagnostics(metrics, out_dir / "diagnostics.png")
        if diag is not None:
            written.append(diag)
    return written
