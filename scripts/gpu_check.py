"""The prepared GPU check: every path a GPU user takes, run once on CUDA, one JSON and one log.

    python scripts/gpu_check.py --out gpu-check                    # on a machine with an NVIDIA GPU (< 8 min, H100)
    python scripts/gpu_check.py --out smoke --accelerator cpu --smoke   # the same plumbing on the CPU, tiny sizes

Nothing outside the machine is needed: the data are the built-in generated sets. Each check runs the `ahm`
command a user would type (in a subprocess, so a crash in one is recorded and the next still runs) and records its
exit code, seconds and the figures it prints or writes. The checks:
  policies   every masking policy for 20 steps in bf16-mixed (ViT), images/s and peak memory from summary.json
  resume     a pretraining stopped by SIGINT once it has a checkpoint, then `--resume` to its end
  official   ahm-official through its three stages (the summary's per-stage diagnostics)
  compile    `--compile` with TORCH_LOGS=recompiles: the number of recompilations
  volumes    3D pretrain, fine-tune, evaluate and predict (configs/3d-gpu.yaml, a few steps)
  syncs      host-device synchronisations per non-logging step of `random` and `ahm`
             (torch.cuda.set_sync_debug_mode on CUDA; Tensor.item/tolist/__float__ calls on the CPU)
  speed      `ahm bench speed` in 32-true and bf16-mixed at batch 256 (2D) and the 3D preset's batch
Written by hand rather than as tests: it needs a GPU, which the test suite must never require.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["random", "block", "hpm", "adamae", "ahm", "ahm-official"]


class Check:
    """Runs commands, appends everything they print to the log, and collects one JSON document."""

    def __init__(self, out: Path, accelerator: str, smoke: bool) -> None:
        self.out, self.accelerator, self.smoke = out, accelerator, smoke
        self.log = (out / "gpu_check.log").open("a")
        self.results: dict[str, Any] = {"accelerator": accelerator, "smoke": smoke, "checks": {}}

    def ahm(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "ahm", "-q", *args]
        self.log.write(f"\n$ {' '.join(cmd)}\n")
        self.log.flush()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                  env={**os.environ, **(env or {})})
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            said = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                           for part in (exc.stdout, exc.stderr))
            rc, output = 124, f"timed out after {timeout} s\n{said}"
        self.log.write(output)
        self.log.flush()
        return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "tail": output.strip().splitlines()[-3:]}

    def record(self, name: str, value: Any) -> None:
        self.results["checks"][name] = value
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))


def summary(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def environment(accelerator: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if accelerator == "cuda" and torch.cuda.is_available():
        info.update({"device": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
                     "bf16": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda})
    return info


def count_syncs(data: Path, accelerator: str, steps: int) -> dict[str, Any]:
    """Host reads per non-logging step of a short pretraining, in this process (the library, not the CLI)."""
    import warnings

    import torch

    from ahm.config import PretrainConfig, build_config
    from ahm.train.pretrain import pretrain

    result: dict[str, Any] = {}
    for policy in ("random", "ahm"):
        cfg = build_config(PretrainConfig, overrides={
            "data": {"path": str(data), "image_size": 64 if accelerator == "cpu" else 128},
            "model": {"backbone": "vit", "patch_size": 16}, "masking": {"policy": policy},
            # logging and checkpoints only after the counted steps: what is left is the training step itself
            "train": {"steps": steps, "batch_size": 16, "log_every": steps, "checkpoint_every": steps,
                      "accelerator": accelerator, "workers": 0,
                      "precision": "bf16-mixed" if accelerator == "cuda" else "32-true"}})
        counted = {"n": 0}
        if accelerator == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pretrain(cfg, data.parent / f"syncs-{policy}", force=True, progress=False)
            torch.cuda.set_sync_debug_mode("default")
            counted["n"] = sum("synchroniz" in str(w.message) for w in caught)
        else:
            originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__")}

            def counting(name, counted=counted, originals=originals):
                def wrapper(self, *a, **k):
                    counted["n"] += 1
                    return originals[name](self, *a, **k)
                return wrapper

            for name in originals:
                setattr(torch.Tensor, name, counting(name))
            try:
                pretrain(cfg, data.parent / f"syncs-{policy}", force=True, progress=False)
            finally:
                for name, fn in originals.items():
                    setattr(torch.Tensor, name, fn)
        # the run's set-up, its one logging step and its end are included: an upper bound per step
        result[policy] = {"steps": steps, "host_reads": counted["n"], "per_step_at_most": counted["n"] / steps}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for gpu_check.json, gpu_check.log, runs.")
    parser.add_argument("--accelerator", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes: check the plumbing, not the GPU.")
    parser.add_argument("--only", default="", help="Comma-separated checks to run (default: all).")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.accelerator, args.smoke)
    only = {c for c in args.only.split(",") if c}

    def wanted(name: str) -> bool:
        return not only or name in only

    acc = ["--accelerator", args.accelerator]
    small = args.smoke or args.accelerator == "cpu"
    # bf16 on a GPU; a CPU without bfloat16 units emulates it tens of times slower, so the smoke run stays fp32
    mixed = "bf16-mixed" if args.accelerator == "cuda" else "32-true"
    size2d = ["--image-size", "64", "--batch-size", "8"] if small else ["--batch-size", "64"]
    check.record("environment", environment(args.accelerator))

    data = out / "data"
    if not (data / "brain" / "splits.json").is_file():
        check.ahm("data", "prepare", "brain-demo", "--out", str(data / "brain"))
    brain = data / "brain"
    runs = out / "runs"

    if wanted("policies"):
        found = {}
        for policy in POLICIES:
            run = runs / f"policy-{policy}"
            res = check.ahm("pretrain", str(brain), "--policy", policy, "--backbone", "vit", "--steps", "20",
                            "--precision", mixed, *acc, *size2d, "--out", str(run), "--force")
            s = summary(run)
            found[policy] = {**res, "images_per_s": s.get("images_per_s"), "final_loss": s.get("final_loss"),
                             "stages": len(s.get("stages", [])) or None}
        check.record("policies", found)
        if "ahm-official" in found:
            check.record("official", {"stages": summary(runs / "policy-ahm-official").get("stages")})

    if wanted("resume"):
        run = runs / "resume"
        cmd = [sys.executable, "-m", "ahm", "-q", "pretrain", str(brain), "--policy", "ahm", "--backbone", "vit",
               "--steps", "60", "--precision", mixed, *acc, *size2d, "--out", str(run), "--force"]
        cfg = out / "resume.yaml"
        cfg.write_text("pretrain:\n  train: {checkpoint_every: 10, log_every: 10}\n")
        proc = subprocess.Popen(cmd + ["--config", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and not (run / "checkpoints" / "last.ckpt").is_file():
            time.sleep(0.2)
        interrupted = proc.poll() is None
        if interrupted:
            proc.send_signal(signal.SIGINT)
        first = proc.communicate(timeout=120)[0]
        check.log.write(first)
        res = check.ahm("pretrain", str(brain), "--out", str(run), "--resume", *acc)
        check.record("resume", {**res, "interrupted_rc": proc.returncode, "interrupted": interrupted,
                                "steps": summary(run).get("steps")})

    if wanted("compile"):
        run = runs / "compile"
        res = check.ahm("pretrain", str(brain), "--policy", "random", "--backbone", "vit", "--steps", "30",
                        "--compile", "--precision", mixed, *acc, *size2d, "--out", str(run), "--force",
                        env={"TORCH_LOGS": "recompiles"}, timeout=400)
        log = (out / "gpu_check.log").read_text()
        section = log[log.rfind(str(run)):]
        check.record("compile", {**res, "recompiles": len(re.findall(r"[Rr]ecompiling", section)),
                                 "images_per_s": summary(run).get("images_per_s")})

    if wanted("volumes"):
        vols = data / "subjects3d"
        if not (vols / "splits.json").is_file():
            check.ahm("data", "prepare", "brain-subjects", "--volumes", "--subjects", "12", "--val-subjects", "2",
                      "--test-subjects", "2", "--out", str(vols))
        preset = ["--config", str(ROOT / "configs" / ("3d-cpu.yaml" if small else "3d-gpu.yaml"))]
        pre, seg = runs / "pre3d", runs / "seg3d"
        found = {"pretrain": check.ahm("pretrain", str(vols), "--spatial-dims", "3", *preset, "--steps", "10",
                                       *acc, "--out", str(pre), "--force", timeout=400)}
        found["finetune"] = check.ahm("finetune", str(vols), "--spatial-dims", "3", *preset, "--init", str(pre),
                                      "--steps", "10", "--accelerator", args.accelerator, "--out", str(seg),
                                      "--force", timeout=400)
        found["evaluate"] = check.ahm("evaluate", str(seg), "--split", "test", timeout=400)
        scans = sorted((vols / "imagesTr").glob("*.nii.gz"))[:1] or sorted(vols.rglob("*.nii.gz"))[:1]
        found["predict"] = check.ahm("predict", str(seg), *map(str, scans), "--out", str(out / "preds3d"),
                                     "--force", timeout=400)
        check.record("volumes", found)

    if wanted("syncs"):
        try:
            check.record("syncs", count_syncs(brain, args.accelerator, 12 if small else 30))
        except Exception as exc:  # recorded, so that the remaining checks still run
            check.record("syncs", {"error": repr(exc)})

    if wanted("speed"):
        found = {}
        batch2d = "8" if small else "256"
        for precision in ("32-true", "bf16-mixed"):
            found[f"2d-{precision}"] = check.ahm("bench", "speed", "--policies", "random,ahm", "--batch-size",
                                                 batch2d, "--precision", precision, "--rounds", "2", timeout=400)
            if not small:
                found[f"3d-{precision}"] = check.ahm("bench", "speed", "--config",
                                                     str(ROOT / "configs" / "3d-gpu.yaml"), "--policies",
                                                     "random", "--precision", precision, "--rounds", "2",
                                                     timeout=400)
        check.record("speed", found)

    failed = [name for name, value in check.results["checks"].items() if isinstance(value, dict) and (
        value.get("rc") not in (None, 0) or any(isinstance(v, dict) and v.get("rc") not in (None, 0)
                                                 for v in value.values()))]
    check.record("failed", failed)
    print(f"gpu check: {len(check.results['checks']) - 2} checks, failed: {', '.join(failed) or 'none'}; "
          f"{out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
