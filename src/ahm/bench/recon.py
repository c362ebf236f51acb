"""`ahm bench recon`: each pretraining run's masked-reconstruction error on images it never trained on.

A run's training loss is measured on its own corpus under its own masks, so it cannot tell a run that learnt
the anatomy from one that memorised its corpus, and runs on different corpora or with different policies are not
comparable by it (a policy that masks hard patches has a higher loss by design). This scores every run on the
same images (a labelled set's validation split, by default) under the same uniform random masks (one seed: the
same patches of every image for every run of one patch grid), in pixel space (de-normalised, so `norm_pix` runs
compare with the others), so that the runs differ only in their weights and their differences are paired by image.

A reference row fills each masked patch with its image's mean visible intensity (per channel): a run no better
than that has learnt nothing about the images.

Runs that differ only in their seed (same backbone, policy, corpus size, steps) are summarised together: the mean
over runs of each run's mean error, the sample standard deviation over runs, and the number of runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ahm.errors import AhmError

MEAN_FILL = "mean-fill"


def _random_masks(n: int, grid: Any, ratio: float, seed: int) -> torch.Tensor:
    """[n, L] bool: round(ratio * L) patches per image, uniformly at random (MAE's masking), from `seed` alone."""
    from ahm.masking.base import random_scores, topk_mask

    generator = torch.Generator().manual_seed(seed)
    k = int(round(ratio * grid.num_patches))
    if not 0 < k < grid.num_patches:
        raise AhmError(f"--mask-ratio {ratio}: masks {k} of {grid.num_patches} patches; give a ratio in (0, 1)")
    return topk_mask(random_scores(n, grid.num_patches, generator, torch.device("cpu")), k)


def _masked_mse(prediction: torch.Tensor, images: torch.Tensor, pixel_mask: torch.Tensor) -> np.ndarray:
    """Per image: the mean squared error over the masked pixels (and channels)."""
    err = ((prediction.float() - images.float()) ** 2 * pixel_mask).flatten(1).sum(1)
    count = (pixel_mask.expand_as(images).flatten(1).sum(1)).clamp_min(1)
    return (err / count).numpy().astype(np.float64)


def _mean_fill(images: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Each masked pixel set to its image's mean visible intensity, per channel."""
    visible = 1.0 - pixel_mask
    dims = tuple(range(2, images.dim()))
    mean = (images * visible).sum(dims, keepdim=True) / visible.sum(dims, keepdim=True).clamp_min(1)
    return images * visible + mean * pixel_mask


def _describe_run(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """What identifies a run among a grid's runs: backbone, policy, seed, steps, corpus images."""
    import json

    corpus_images = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        corpus_images = json.loads(summary.read_text()).get("corpus_images")
    if corpus_images is None and (run_dir / "corpus.json").is_file():
        corpus_images = json.loads((run_dir / "corpus.json").read_text()).get("entries")
    return {"run": str(run_dir), "name": run_dir.name, "backbone": cfg.model.backbone, "policy": cfg.masking.policy,
            "seed": cfg.train.seed, "steps": cfg.train.steps, "corpus_images": corpus_images}


@torch.no_grad()
def recon_scores(runs: list[str | Path], data: str | Path | None = None, split: str = "val",
                 mask_ratio: Optional[float] = None, seed: int = 0, n_images: Optional[int] = None,
                 batch_size: int = 32, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score `runs` on `split` of `data` (default: the dataset the first run recorded). Returns
    {"split", "data", "mask_ratio", "seed", "n_images", "ids", "rows": [per run, then the mean-fill reference],
    "groups": [runs summarised over seeds]}; each row carries its per-image errors ("per_image")."""
    from ahm.eval.visualize import load_run

    if not runs:
        raise AhmError("RUN: give at least one pretraining run directory")
    if batch_size < 1:
        raise AhmError(f"--batch-size must be at least 1, got {batch_size}")
    data_dir = Path(data) if data is not None else None
    rows: list[dict[str, Any]] = []
    ids: list[str] | None = None
    masks = images = pixel_mask = None
    grid_shape = None
    for k, run in enumerate(runs, 1):
        run_dir = Path(run)
        cfg, model, policy, arrays = load_run(run_dir, data_dir, n_images, split=split)
        policy.close()
        if data_dir is None:  # every run is scored on the images the first one named
            data_dir = Path(cfg.data.path)
        if ids is None:
            ids, grid_shape = list(arrays.ids), tuple(model.patch_grid.spatial_shape)
            ratio = float(cfg.masking.mask_ratio if mask_ratio is None else mask_ratio)
            images = torch.from_numpy(np.ascontiguousarray(arrays.images)).float()
            masks = _random_masks(len(ids), model.patch_grid, ratio, seed)
            pixel_mask = model.patch_grid.upsample(masks.float()).to(images.dtype)
        elif list(arrays.ids) != ids:
            raise AhmError(f"{run_dir}: reads other {split} images of {data_dir} than {runs[0]} (its data settings "
                           "split or preprocess the set differently); score such runs apart")
        elif tuple(model.patch_grid.spatial_shape) != grid_shape:
            raise AhmError(f"{run_dir}: its patch grid differs from {runs[0]}'s, so the masks cannot be the same; "
                           "score such runs apart")
        per_image = []
        for start in range(0, len(ids), batch_size):
            part = slice(start, start + batch_size)
            out = model(images[part], masks[part])
            per_image.append(_masked_mse(out.prediction, images[part], pixel_mask[part]))
        errors = np.concatenate(per_image)
        rows.append({**_describe_run(run_dir, cfg), "mse": float(errors.mean()),
                     "mse_sd": float(errors.std(ddof=1)) if len(errors) > 1 else 0.0, "per_image": errors.tolist()})
        if log is not None:
            log(f"[{k}/{len(runs)}] {run_dir.name}: masked MSE {rows[-1]['mse']:.5f}")
    assert images is not None and pixel_mask is not None and ids is not None
    fill = _masked_mse(_mean_fill(images, pixel_mask), images, pixel_mask)
    reference = {"run": None, "name": MEAN_FILL, "backbone": None, "policy": MEAN_FILL, "seed": None, "steps": None,
                 "corpus_images": None, "mse": float(fill.mean()),
                 "mse_sd": float(fill.std(ddof=1)) if len(fill) > 1 else 0.0, "per_image": fill.tolist()}
    return {"split": split, "data": str(data_dir), "mask_ratio": ratio, "seed": seed, "n_images": len(ids),
            "ids": ids, "rows": [*rows, reference], "groups": _groups(rows)}


def _groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that differ only in seed, summarised: mean and sample sd over runs of each run's mean error."""
    keyed: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["backbone"], r["policy"], r["corpus_images"], r["steps"]), []).append(r)
    out = []
    for (backbone, policy, corpus_images, steps), members in keyed.items():
        values = np.array([m["mse"] for m in members])
        out.append({"backbone": backbone, "policy": policy, "corpus_images": corpus_images, "steps": steps,
                    "runs": len(members), "mse": float(values.mean()),
                    "mse_sd": float(values.std(ddof=1)) if len(values) > 1 else None,
                    "seeds": [m["seed"] for m in members]})
    return out


def format_recon(result: dict[str, Any]) -> str:
    """Markdown: the per-run table, then the runs summarised over seeds."""
    lines = [f"Masked reconstruction error (MSE over masked pixels, intensities as the model reads them) on "
             f"{result['n_images']} {result['split']} images of {result['data']}; uniform random masks, ratio "
             f"{result['mask_ratio']:g}, seed {result['seed']}, the same patches for every run. Mean (sd) over images.",
             "", "| run | policy | corpus images | steps | seed | masked MSE |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['policy']} | {_v(r['corpus_images'])} | {_v(r['steps'])} | "
                     f"{_v(r['seed'])} | {r['mse']:.5f} ({r['mse_sd']:.5f}) |")
    lines += ["", "Over seeds: mean (sd over runs) of each run's mean.", "",
              "| backbone | policy | corpus images | steps | runs | masked MSE |", "|---|---|---|---|---|---|"]
    for g in result["groups"]:
        sd = "" if g["mse_sd"] is None else f" ({g['mse_sd']:.5f})"
        lines.append(f"| {g['backbone']} | {g['policy']} | {_v(g['corpus_images'])} | {_v(g['steps'])} | "
                     f"{g['runs']} | {g['mse']:.5f}{sd} |")
    return "\n".join(lines)


def _v(value: Any) -> str:
    return "-" if value is None else str(value)
