"""`ahm bench predict`: how fast a fine-tuned run segments slices, the way `ahm predict` does it.

N synthetic grey-level PNGs of the run's grid size (or the user's own images) are segmented by the real
`predict()` into a temporary folder, `rounds` times; the first round also pays one-off costs (thread pools,
allocator warm-up). Reported: slices/s end to end as `ahm predict` prints it (reading, resizing, the model,
writing the masks; model loading excluded), the model alone, and the model-loading time.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ahm.errors import AhmError


def _synthetic_inputs(folder: Path, n: int, size: int, channels: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    paths = []
    for i in range(n):
        # Smooth blobs plus noise: content does not change the cost, but keep it image-like for the PNG codec.
        base = 127 + 100 * np.sin(6.28 * (xx * rng.uniform(1, 3) + yy * rng.uniform(1, 3)))
        planes = [np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8) for _ in range(channels)]
        arr = planes[0] if channels == 1 else np.stack(planes, axis=-1)
        path = folder / f"slice{i:04d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def run_predict_bench(run_dir: str | Path, n: int = 100, inputs: list[Path] | None = None, rounds: int = 3,
                      batch_size: int = 32, threads: int | None = None) -> dict[str, Any]:
    """Time `predict()` over `n` slices `rounds` times; returns the figures of each round and their median."""
    import torch

    from ahm.eval.evaluate import load_run
    from ahm.eval.predict import predict

    if n < 1:
        raise AhmError(f"--n {n}: must be at least 1")
    if rounds < 1:
        raise AhmError(f"--rounds {rounds}: must be at least 1")
    if threads is not None:
        if threads < 1:
            raise AhmError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run = load_run(run_dir)  # also refuses a folder that is not a fine-tuning run, in one line
    load_s = time.perf_counter() - t0
    meta = {"segmenter": run.cfg.segmenter, "image_size": run.image_size, "in_channels": run.in_channels,
            "num_classes": run.num_classes}
    del run
    results = []
    with tempfile.TemporaryDirectory(prefix="ahm-bench-predict-") as tmp:
        tmp_path = Path(tmp)
        if inputs:
            files = list(inputs)
            source = f"{len(files)} given input(s)"
        else:
            (tmp_path / "in").mkdir()
            files = _synthetic_inputs(tmp_path / "in", n, meta["image_size"], meta["in_channels"])
            source = f"{n} synthetic {meta['image_size']}x{meta['image_size']} PNG slices"
        for r in range(rounds):
            res = predict(run_dir, files, tmp_path / f"out{r}", batch_size=batch_size)
            if res["n_failed"]:
                raise AhmError(f"bench predict: {res['n_failed']} input(s) failed: {res['failures'][0]}")
            results.append({"slices": res["slices"], "total_s": res["total_s"], "model_s": res["model_s"],
                            "slices_per_s": res["slices_per_s"],
                            "model_slices_per_s": res["slices"] / res["model_s"] if res["model_s"] > 0 else 0.0})
    return {
        "run": str(run_dir), **meta, "source": source, "rounds": results, "batch_size": batch_size,
        "threads": torch.get_num_threads(), "load_s": load_s,
        "slices_per_s": statistics.median(r["slices_per_s"] for r in results),
        "model_slices_per_s": statistics.median(r["model_slices_per_s"] for r in results),
    }


def format_predict_bench(doc: dict[str, Any]) -> str:
    return "\n".join([
        f"ahm predict with {doc['segmenter']} ({doc['image_size']} px grid, {doc['num_classes']} classes), "
        + f"{doc['source']}, batch {doc['batch_size']}, {doc['threads']} thread(s), median of "
        + f"{len(doc['rounds'])} round(s):",
        f"  end to end (read, model, write; as `ahm predict` reports it): {doc['slices_per_s']:.1f} slices/s",
        f"  model alone: {doc['model_slices_per_s']:.1f} slices/s",
        f"  loading the run (once per command): {doc['load_s']:.2f} s",
    ])
