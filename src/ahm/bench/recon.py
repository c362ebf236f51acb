"""`ahm bench recon`: each pretraining run's masked-reconstruction error on images it never trained on.

A run's training loss is measured on its own corpus under its own masks, so it cannot tell a run that learnt
the anatomy from one that memorised its corpus, and runs on different corpora or with different policies are not
comparable by it (a policy that masks hard patches has a higher loss by design). This scores every run on the
same images (a labelled set's validation split, by default) under the same uniform random masks (one seed: the
same patches of every image for every run of one patch grid), as the mean squared error over the masked pixels,
so that the runs differ only in their weights and their differences are paired by image.

Two references: mean-fill sets each masked patch to its image's mean visible intensity (per channel), the floor
of a run that reconstructs pixels; patch-mean-fill sets it to the patch's own true mean. A `norm_pix` run
predicts normalised patches, and de-normalising them uses the true patch's mean and spread, so its pixel error
is already given that much: patch-mean-fill is its floor (what it scores predicting nothing), and norm_pix runs
and pixel runs are not compared in one call.

Runs whose resolved configs differ only in the seed (and in how they executed: threads, devices, workers,
checkpointing) are summarised together: the mean over runs of each run's mean error, the sample standard
deviation over runs, and the number of runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ahm.bench.compare import _mean_std
from ahm.errors import AhmError

MEAN_FILL = "mean-fill"
PATCH_MEAN_FILL = "patch-mean-fill"
# Fields that change how a run executes, not what it learns: runs differing only in these (and the seed) are seeds
# of one setting.
_EXECUTION = ("seed", "accelerator", "devices", "num_threads", "workers", "checkpoint_every", "log_every", "compile")


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


def _patch_mean_fill(images: torch.Tensor, grid: Any) -> torch.Tensor:
    """Every patch set to its own true mean (over its pixels and channels): what a `norm_pix` run's reconstruction
    is, de-normalised, when it predicts nothing (0 in normalised units), since de-normalising uses the true
    patch's mean and spread."""
    patches = grid.patchify(images)
    return grid.unpatchify(patches.mean(-1, keepdim=True).expand_as(patches), images.shape[1])


def _seen(run_dir: Path, cfg: Any, data_dir: Path, split: str) -> bool | None:
    """Whether the run pretrained on `split` of `data_dir`: True, False, or None when its corpus is not recorded.
    A labelled source gives pretraining its training split only (unless all_splits); an unlabelled one all."""
    from ahm.eval.visualize import find_recorded

    corpus = run_dir / "corpus.json"
    if not corpus.is_file():
        return None
    target = data_dir.resolve()
    for source in json.loads(corpus.read_text()).get("sources", []):
        found = find_recorded(source.get("path"), run_dir)
        if found is not None and found.resolve() == target:
            return not source.get("labelled", True) or bool(cfg.all_splits) or split == "train"
    return False


def _setting(cfg: Any) -> str:
    """The run's resolved config without its seed and execution fields, as text: equal for seeds of one setting."""
    doc = cfg.model_dump(mode="json")
    for key in _EXECUTION:
        doc["train"].pop(key, None)
    return json.dumps(doc, sort_keys=True)


def _describe_run(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """What identifies a run among a grid's runs: backbone, policy, seed, steps, corpus images."""
    corpus_images = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        corpus_images = json.loads(summary.read_text()).get("corpus_images")
    if corpus_images is None and (run_dir / "corpus.json").is_file():
        corpus_images = json.loads((run_dir / "corpus.json").read_text()).get("entries")
    return {"run": str(run_dir), "name": run_dir.name, "backbone": cfg.model.backbone, "policy": cfg.masking.policy,
            "seed": cfg.train.seed, "steps": cfg.train.steps, "corpus_images": corpus_images,
            "norm_pix": bool(cfg.model.norm_pix)}


def _errors(errors: np.ndarray) -> dict[str, Any]:
    """A row's figures: mean and sample sd over images of the per-image errors, and the errors themselves."""
    per_image = errors.tolist()
    mse, mse_sd = _mean_std(per_image)
    return {"mse": mse, "mse_sd": mse_sd, "per_image": per_image}


def _reference(name: str, errors: np.ndarray, norm_pix: bool) -> dict[str, Any]:
    return {"run": None, "name": name, "backbone": None, "policy": name, "seed": None, "steps": None,
            "corpus_images": None, "norm_pix": norm_pix, "seen": None, **_errors(errors)}


@torch.no_grad()
def recon_scores(runs: list[str | Path], data: str | Path | None = None, split: str = "val",
                 mask_ratio: float | None = None, seed: int = 0, n_images: int | None = None,
                 batch_size: int = 32, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score `runs` on `split` of `data` (default: the dataset the first run recorded). Returns
    {"split", "data", "mask_ratio", "seed", "n_images", "norm_pix", "ids", "rows": [per run, then the references],
    "groups": [runs summarised over seeds]}; each row carries its per-image errors ("per_image") and whether
    the run pretrained on these images ("seen")."""
    from ahm.config import PretrainConfig, load_config
    from ahm.eval.visualize import _recorded_data, load_run

    if not runs:
        raise AhmError("RUN: give at least one pretraining run directory")
    if batch_size < 1:
        raise AhmError(f"--batch-size must be at least 1, got {batch_size}")
    if n_images is not None and n_images < 1:
        raise AhmError(f"--n-images must be at least 1, got {n_images}")
    given: dict[Path, str] = {}
    for run in runs:
        key = Path(run).resolve()
        if key in given:
            raise AhmError(f"{run}: given twice (also as {given[key]})")
        given[key] = str(run)
    if data is None:  # every run is scored on the images of the dataset the first one recorded
        first = Path(runs[0])
        if not (first / "config.yaml").is_file():
            raise AhmError(f"{first}: not a pretraining run directory (no config.yaml)")
        data = _recorded_data(load_config(PretrainConfig, first / "config.yaml").data.path, first)
    data_dir = Path(data)
    rows: list[dict[str, Any]] = []
    settings: list[str] = []
    first_images = images = masks = pixel_mask = grid = norm_pix = ids = None
    for k, run in enumerate(runs, 1):
        run_dir = Path(run)
        cfg, model, policy, arrays = load_run(run_dir, data_dir, n_images, split=split)
        policy.close()
        if ids is None:
            ids, grid, norm_pix = list(arrays.ids), model.patch_grid, bool(cfg.model.norm_pix)
            first_images = np.ascontiguousarray(arrays.images)
            ratio = float(cfg.masking.mask_ratio if mask_ratio is None else mask_ratio)
            images = torch.from_numpy(first_images).float()
            masks = _random_masks(len(ids), grid, ratio, seed)
            pixel_mask = grid.upsample(masks.float()).to(images.dtype)
        elif model.patch_grid != grid:
            raise AhmError(f"{run_dir}: its patch grid ({model.patch_grid.shape} patches of "
                           f"{model.patch_grid.patch_size}) differs from {runs[0]}'s, so the masks cannot be the "
                           "same; score such runs apart")
        elif list(arrays.ids) != ids or not np.array_equal(arrays.images, first_images):
            raise AhmError(f"{run_dir}: reads the {split} images of {data_dir} otherwise than {runs[0]} (other data "
                           "settings: size, channels, normalisation); score such runs apart")
        elif bool(cfg.model.norm_pix) != norm_pix:
            raise AhmError(f"{run_dir}: norm_pix {cfg.model.norm_pix}, {runs[0]}: norm_pix {norm_pix}; a norm_pix "
                           "reconstruction is de-normalised with each patch's true mean and spread, so the two "
                           "kinds do not compare; score them apart")
        per_image = []
        for start in range(0, len(ids), batch_size):
            part = slice(start, start + batch_size)
            out = model(images[part], masks[part])
            per_image.append(_masked_mse(out.prediction, images[part], pixel_mask[part]))
        errors = np.concatenate(per_image)
        rows.append({**_describe_run(run_dir, cfg), "seen": _seen(run_dir, cfg, data_dir, split), **_errors(errors)})
        settings.append(_setting(cfg))
        if log is not None:
            log(f"[{k}/{len(runs)}] {run_dir.name}: masked MSE {rows[-1]['mse']:.5f}")
    assert images is not None and pixel_mask is not None and ids is not None and grid is not None
    references = [
        _reference(MEAN_FILL, _masked_mse(_mean_fill(images, pixel_mask), images, pixel_mask), False),
        _reference(PATCH_MEAN_FILL, _masked_mse(_patch_mean_fill(images, grid), images, pixel_mask), True),
    ]
    return {"split": split, "data": str(data_dir.resolve()), "mask_ratio": ratio, "seed": seed, "n_images": len(ids),
            "norm_pix": norm_pix, "ids": ids, "rows": [*rows, *references], "groups": _groups(rows, settings)}


def _groups(rows: list[dict[str, Any]], settings: list[str]) -> list[dict[str, Any]]:
    """Runs whose configs differ only in seed (and execution), summarised: mean and sample sd over runs of each
    run's mean error."""
    keyed: dict[str, list[dict[str, Any]]] = {}
    for r, setting in zip(rows, settings):
        keyed.setdefault(setting, []).append(r)
    out = []
    for members in keyed.values():
        values = np.array([m["mse"] for m in members])
        first = members[0]
        out.append({"backbone": first["backbone"], "policy": first["policy"], "corpus_images": first["corpus_images"],
                    "steps": first["steps"], "runs": len(members), "mse": float(values.mean()),
                    "mse_sd": float(values.std(ddof=1)) if len(values) > 1 else None,
                    "seeds": [m["seed"] for m in members], "names": [m["name"] for m in members]})
    return out


def format_recon(result: dict[str, Any]) -> str:
    """Markdown: the per-run table with the references, then the runs summarised over seeds."""
    kind = ("norm_pix runs: de-normalised with each masked patch's true mean and spread, so their floor is "
            f"{PATCH_MEAN_FILL}" if result["norm_pix"] else
            f"pixel runs (no norm_pix): their floor is {MEAN_FILL}; {PATCH_MEAN_FILL} knows each patch's true mean")
    lines = [f"Masked reconstruction error (MSE over masked pixels, intensities as the model reads them) on "
             f"{result['n_images']} {result['split']} images of {result['data']}; uniform random masks, ratio "
             f"{result['mask_ratio']:g}, seed {result['seed']}, the same patches for every run; {kind}. Mean (sd) "
             "over images. `seen`: the run pretrained on these images (judged by folder, not by content).",
             "", "| run | policy | corpus images | steps | seed | seen | masked MSE |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        seen = "-" if r["seen"] is None else ("yes" if r["seen"] else "no")
        lines.append(f"| {r['name']} | {r['policy']} | {_v(r['corpus_images'])} | {_v(r['steps'])} | "
                     f"{_v(r['seed'])} | {seen} | {r['mse']:.5f} ({r['mse_sd']:.5f}) |")
    lines += ["", "Runs whose configs differ only in the seed: mean (sd over runs) of each run's mean.", "",
              "| backbone | policy | corpus images | steps | runs | masked MSE |", "|---|---|---|---|---|---|"]
    for g in result["groups"]:
        sd = "" if g["mse_sd"] is None else f" ({g['mse_sd']:.5f})"
        lines.append(f"| {g['backbone']} | {g['policy']} | {_v(g['corpus_images'])} | {_v(g['steps'])} | "
                     f"{g['runs']} | {g['mse']:.5f}{sd} |")
    return "\n".join(lines)


def _v(value: Any) -> str:
    return "-" if value is None else str(value)
