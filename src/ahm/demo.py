"""The main job, end to end on the built-in brain set: prepare, pretrain with AHM, fine-tune on 10% of the
labels, evaluate on the held-out test slabs, write the report."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ahm.config import FinetuneConfig, PretrainConfig, build_config
from ahm.errors import AhmError

CONFIG_DIR = Path(__file__).resolve().parent / "presets"


def demo_configs(quick: bool, data: Path) -> tuple[PretrainConfig, FinetuneConfig]:
    """The demo's settings: `demo-quick.yaml` (make demo, CPU minutes) or `demo.yaml` (longer)."""
    from ahm.config import read_yaml

    preset = read_yaml(CONFIG_DIR / ("demo-quick.yaml" if quick else "demo.yaml"))
    pre = build_config(PretrainConfig, overrides={**preset.get("pretrain", {}), "data": {
        **preset.get("pretrain", {}).get("data", {}), "path": str(data)}}, source="demo preset", nulls=True)
    ft = build_config(FinetuneConfig, overrides={**preset.get("finetune", {}), "data": {
        **preset.get("finetune", {}).get("data", {}), "path": str(data)}}, source="demo preset", nulls=True)
    return pre, ft


def run_demo(out: str | Path, quick: bool = True, force: bool = False, progress: bool = True,
             say: Callable[[str], None] | None = None) -> dict[str, Any]:
    from ahm.datasets import prepare_brain_demo
    from ahm.eval.evaluate import evaluate
    from ahm.eval.report import write_report
    from ahm.train.finetune import finetune
    from ahm.train.pretrain import pretrain

    say = say or (lambda msg: None)
    out = Path(out)
    if (out.exists() and any(out.iterdir()) and not force and not (out / "demo.json").exists()
            and not (out / "data").is_dir()):
        raise AhmError(f"--out {out}: directory is not empty and is not an earlier demo; choose another or --force")
    t0 = time.perf_counter()
    data = out / "data"
    timings: dict[str, float] = {}
    if not (data / "splits.json").is_file():
        say("1/4 building the brain MRI set from the MNI152 template (nilearn)")
        prepare_brain_demo(data)
    timings["prepare_s"] = time.perf_counter() - t0
    pre_cfg, ft_cfg = demo_configs(quick, data)
    pre_dir, ft_dir = out / "pretrain", out / "finetune"
    say(f"2/4 pretraining a {pre_cfg.model.backbone} with {pre_cfg.masking.policy} masking, "
        f"{pre_cfg.train.steps} steps")
    t = time.perf_counter()
    pre_summary = _resumable(pretrain, pre_cfg, pre_dir, progress)
    timings["pretrain_s"] = time.perf_counter() - t
    say(f"3/4 fine-tuning on {ft_cfg.labels_fraction:.0%} of the labelled training slabs")
    ft_cfg.init = str(pre_dir)
    t = time.perf_counter()
    ft_summary = _resumable(finetune, ft_cfg, ft_dir, progress)
    timings["finetune_s"] = time.perf_counter() - t
    say("4/4 evaluating on the held-out test slabs and writing the report")
    t = time.perf_counter()
    metrics = evaluate(ft_dir, data, split="test", progress=False)
    report = write_report(ft_dir)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    result = {
        "dice": metrics["dice"], "iou": metrics["iou"], "hd95": metrics["hd95"],
        "per_class": metrics.get("per_class"), "report": str(report), "pretrain": pre_summary,
        "finetune": ft_summary, "timings": timings,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "quick": quick,
    }
    from ahm.io import write_json

    write_json(out / "demo.json", result)
    return result


def _resumable(fn, cfg, run_dir: Path, progress: bool) -> dict[str, Any]:
    import json

    if (run_dir / "summary.json").is_file() and (run_dir / "checkpoints").is_dir() and _finished(run_dir):
        return json.loads((run_dir / "summary.json").read_text())
    resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
    return fn(cfg, run_dir, resume=resume, force=run_dir.exists() and not resume, progress=progress)


def _finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()
