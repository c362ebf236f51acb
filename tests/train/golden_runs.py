"""The seeded 2D runs whose first 20 logged losses are pinned in golden_2d.json (recorded at the
backbone / patch-grid refactor of 2026-12-02; refactors must leave 2D training unchanged).

`python tests/train/golden_runs.py` re-records them; do that only for a change that is meant to alter 2D
training, and say so in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
GOLDEN = HERE / "golden_2d.json"
STEPS = 20

PRETRAIN_CASES = [("vit", "random"), ("vit", "block"), ("vit", "hpm"), ("vit", "adamae"), ("vit", "ahm"),
                  ("unet", "random"), ("unet", "ahm"), ("unet", "ahm-official"), ("vit16", "random")]
FINETUNE_CASES = [("unet", None), ("unet", "random"), ("unetr", "random")]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r][:STEPS]


def run_all(work: Path) -> dict[str, list[float]]:
    """Pretrain every case 20 steps and fine-tune from some of them; the logged losses by case name."""
    import torch
    from train_helpers import make_blob_folder, tiny_pretrain_overrides

    from ahm.config import FinetuneConfig, PretrainConfig, build_config
    from ahm.train.finetune import finetune
    from ahm.train.pretrain import pretrain

    torch.set_num_threads(1)
    data = make_blob_folder(work / "data", n=16)
    out: dict[str, list[float]] = {}
    for backbone, policy in PRETRAIN_CASES:
        over = tiny_pretrain_overrides(data, policy=policy, backbone=backbone.removesuffix("16"), steps=STEPS)
        if backbone == "vit16":  # MONAI's UNETR cuts 16-pixel patches
            over["model"].update(patch_size=16, num_layers=12, hidden_size=16, mlp_dim=32)
        cfg = build_config(PretrainConfig, overrides=over)
        run = work / f"pre-{backbone}-{policy}"
        pretrain(cfg, run, progress=False)
        out[f"pretrain/{backbone}/{policy}"] = _losses(run)
    for segmenter, init in FINETUNE_CASES:
        backbone = "vit16" if segmenter == "unetr" else "unet"
        model = tiny_pretrain_overrides(data, backbone=backbone.removesuffix("16"))["model"]
        if backbone == "vit16":
            model.update(patch_size=16, num_layers=12, hidden_size=16, mlp_dim=32)
        over = {"data": {"path": str(data), "image_size": 32, "val_fraction": 0.2, "test_fraction": 0.2},
                "model": model, "segmenter": segmenter,
                "init": str(work / f"pre-{backbone}-{init}") if init else None,
                "train": {"steps": STEPS, "batch_size": 2, "warmup_steps": 2, "log_every": 1, "seed": 5,
                          "accelerator": "cpu"}}
        run = work / f"ft-{segmenter}-{init or 'scratch'}"
        finetune(build_config(FinetuneConfig, overrides=over), run, progress=False)
        out[f"finetune/{segmenter}/{init or 'scratch'}"] = _losses(run)
    return out


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as tmp:
        losses = run_all(Path(tmp))
    GOLDEN.write_text(json.dumps(losses, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {', '.join(f'{k} ({len(v)})' for k, v in losses.items())}")
