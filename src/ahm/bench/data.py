"""`ahm bench data`: does streamed pretraining keep its memory flat as the corpus grows, start fast, and keep pace?

Two generated corpora of NIfTI volumes (same volume size; `--large` and `--small` volumes) are pretrained on by real
`ahm pretrain` processes for `--steps` steps with the same settings, streamed (`preload: no`, `--workers` loader
processes). Each process is watched from outside: the peak resident memory of its whole process tree (the loader
workers included, read from /proc every 0.1 s, so Linux only), the time from launch to its first logged step,
and the images/s it logs after warm-up. The small corpus is also pretrained on preloaded into memory
(`preload: yes`, the same samples), the in-memory pace the streamed one is compared with.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ahm.errors import AhmError

WARMUP_STEPS = 10  # logged steps left out of the pace


def make_volume_corpus(root: Path, volumes: int, slices: int, size: int, seed: int = 0) -> Path:
    """`volumes` unlabelled NIfTI volumes of `size` x `size` x `slices` (int16, smooth phantoms with noise) in
    `root/images`: the folder layout. Existing volumes of the same name are kept (the corpus is resumable)."""
    import nibabel as nib

    if volumes < 1 or slices < 1 or not 16 <= size <= 1024:
        raise AhmError(f"--volumes/--slices/--size: {volumes}, {slices}, {size} do not make a corpus")
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.mgrid[0:size, 0:size, 0:slices].astype(np.float32)
    for v in range(volumes):
        path = folder / f"vol{v:05d}.nii.gz"
        if path.is_file():
            continue
        rng = np.random.default_rng([seed, v])
        centre = rng.uniform(0.3, 0.7, 3) * np.array([size, size, slices])
        radius = rng.uniform(0.2, 0.35) * size
        d = np.sqrt(((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2) + (grid[2] - centre[2]) ** 2 * 0.2)
        img = 400 * (d < radius) + 200 * (d < radius * 0.5) + rng.normal(0, 20, grid.shape[1:])
        tmp = path.with_name(path.name + ".part.nii.gz")
        nib.save(nib.Nifti1Image(img.astype(np.int16), np.eye(4)), tmp)
        os.replace(tmp, path)
    return root


def _tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (/proc), MiB."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo += [int(c) for c in children]
        except (OSError, ValueError):
            continue
    return total / 1024


def measure_pretrain(data: Path, out: Path, steps: int, workers: int, preload: str, config: Path | None,
                     extra: list[str] | None = None) -> dict[str, Any]:
    """Run `ahm pretrain` in a child process and watch it: peak tree RSS, time to the first step, images/s."""
    if not Path("/proc/self/status").is_file():
        raise AhmError("ahm bench data reads /proc to watch memory: Linux only")
    cmd = [sys.executable, "-m", "ahm", "--quiet", "pretrain", str(data), "--out", str(out), "--steps", str(steps),
           "--workers", str(workers), "--force"] + (["--config", str(config)] if config else []) + (extra or [])
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        child = subprocess.Popen(cmd + ["--preload", preload], stdout=fh, stderr=subprocess.STDOUT)
        peak, first_step = 0.0, None
        metrics = out / "metrics.jsonl"
        while child.poll() is None:
            peak = max(peak, _tree_rss_mib(child.pid))
            if first_step is None and metrics.is_file() and metrics.stat().st_size > 0:
                first_step = time.perf_counter() - t0
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise AhmError(f"ahm pretrain on {data} failed: {tail[0]} (log: {log})")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r and r.get("step", 0) > WARMUP_STEPS]
    summary = json.loads((out / "summary.json").read_text())
    return {"peak_rss_mib": peak, "first_step_s": first_step, "wall_s": wall,
            "images_per_s": statistics.median(rates) if rates else None, "preloaded": summary.get("preloaded"),
            "workers": summary.get("loader_workers"), "corpus_images": summary.get("corpus_images")}


def measure_cache(data: Path, cache: Path, size: int, batch_size: int, workers: int) -> dict[str, Any]:
    """Samples/s of the loader alone (no training step) over two epochs through a new on-disk sample cache: the
    first epoch decodes and fills it, the second reads it."""
    import shutil

    from ahm.config import PretrainConfig, build_config
    from ahm.data.corpus import CorpusDataset, SampleCache, StepBatches, make_loader, open_corpus

    if cache.exists():
        shutil.rmtree(cache)
    cfg = build_config(PretrainConfig, overrides={"data": {"path": str(data), "image_size": size}})
    corpus = open_corpus(cfg)
    dataset = CorpusDataset(corpus, None, 0, cache=SampleCache(cache, corpus))
    batch_size = min(batch_size, corpus.epoch_size)
    per_epoch = corpus.steps_per_epoch(batch_size, 1)
    rates = []
    for epoch in range(2):
        loader = make_loader(dataset, StepBatches(corpus, 0, batch_size, epoch * per_epoch, (epoch + 1) * per_epoch),
                             workers)
        t0 = time.perf_counter()
        n = sum(len(batch["entry"]) for batch in loader)
        rates.append(n / (time.perf_counter() - t0))
    return {"first_epoch_samples_per_s": rates[0], "second_epoch_samples_per_s": rates[1],
            "speed_up": rates[1] / rates[0], "workers": workers, "batch_size": batch_size}


def run_data_bench(root: Path, large: int = 200, small: int = 20, slices: int = 100, size: int = 128,
                   steps: int = 50, workers: int = 2, config: Path | None = None,
                   extra: list[str] | None = None, log: Any = None) -> dict[str, Any]:
    """Make (or reuse) both corpora under `root`, pretrain on each, and return the figures and their ratios."""
    say = log or (lambda msg: None)
    root = Path(root)
    corpora = {}
    for name, n in (("large", large), ("small", small)):
        say(f"corpus {name}: {n} volumes of {size}x{size}x{slices}")
        corpora[name] = make_volume_corpus(root / name, n, slices, size)
    runs = {}
    for name, data, preload in (("large", corpora["large"], "no"), ("small", corpora["small"], "no"),
                                ("small_in_memory", corpora["small"], "yes")):
        say(f"pretrain on {name} ({steps} steps, {workers} workers, preload {preload})")
        runs[name] = measure_pretrain(data, root / "runs" / name, steps, workers, preload, config, extra)
    say(f"loader alone through the on-disk cache, small corpus, 2 epochs ({workers} workers)")
    cache = measure_cache(corpora["small"], root / "cache", size, 16, workers)
    ratio = runs["large"]["peak_rss_mib"] / runs["small"]["peak_rss_mib"]
    pace = (runs["small"]["images_per_s"] / runs["small_in_memory"]["images_per_s"]
            if runs["small"]["images_per_s"] and runs["small_in_memory"]["images_per_s"] else None)
    return {"setting": {"large_volumes": large, "small_volumes": small, "slices": slices, "size": size,
                        "steps": steps, "workers": workers, "config": str(config) if config else None,
                        "cpus": os.cpu_count()},
            "runs": runs, "memory_ratio_large_over_small": ratio, "streamed_over_in_memory": pace, "cache": cache,
            "targets": {"memory_ratio": "<= 1.1", "first_step_s_large": "< 30", "streamed_over_in_memory": ">= 0.9"}}


def format_data_bench(doc: dict[str, Any]) -> str:
    s = doc["setting"]
    lines = [f"ahm bench data: {s['large_volumes']} and {s['small_volumes']} volumes of {s['size']}x{s['size']}x"
             f"{s['slices']} ({s['large_volumes'] * s['slices']} and {s['small_volumes'] * s['slices']} slices), "
             f"{s['steps']} pretraining steps, {s['workers']} loader workers, {s['cpus']} CPUs",
             "| corpus | loading | peak RSS (MiB, process tree) | first step (s) | images/s (after warm-up) |",
             "|---|---|---|---|---|"]
    for name, r in doc["runs"].items():
        how = "preloaded" if r["preloaded"] else "streamed"
        lines.append(f"| {name.replace('_in_memory', '')} | {how} | {r['peak_rss_mib']:.0f} | "
                     f"{r['first_step_s'] if r['first_step_s'] is None else round(r['first_step_s'], 1)} | "
                     f"{r['images_per_s'] if r['images_per_s'] is None else round(r['images_per_s'], 1)} |")
    pace = doc["streamed_over_in_memory"]
    lines.append(f"peak memory large / small: {doc['memory_ratio_large_over_small']:.3f} (target <= 1.1); "
                 f"streamed / in-memory pace on the small corpus: {'-' if pace is None else f'{pace:.2f}'} "
                 f"(target >= 0.9); first step on the large corpus: {doc['runs']['large']['first_step_s']:.1f} s "
                 f"(target < 30)")
    c = doc["cache"]
    lines.append(f"on-disk cache, loader alone on the small corpus: first epoch {c['first_epoch_samples_per_s']:.0f} "
                 f"samples/s (decoding, filling it), second {c['second_epoch_samples_per_s']:.0f} samples/s: "
                 f"{c['speed_up']:.1f}x")
    return "\n".join(lines)
