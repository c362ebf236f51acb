"""Pretrain, fine-tune, evaluate and predict from Python, on the built-in brain MRI set.

    python examples/quickstart.py --out quickstart          # a small real run: about 10 minutes on 2 CPU cores
    python examples/quickstart.py --out quickstart --tiny   # the same path in seconds (what CI runs)

Replace the prepared set by a folder of your own (any layout `ahm data check` recognises).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ahm
from ahm.config import FinetuneConfig, PretrainConfig
from ahm.datasets import prepare_brain_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the data and the runs")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks the path, learns nothing")
    args = parser.parse_args()

    data = args.out / "brain"
    if not data.exists():
        prepare_brain_demo(data, image_size=64 if args.tiny else 128)

    # Small sizes for the tiny run; otherwise the defaults (ViT-Tiny at 128 px) with the demo's UNet.
    model = ({"backbone": "unet", "unet_channels": [8, 16], "unet_strides": [2], "patch_size": 8} if args.tiny
             else {"backbone": "unet", "unet_channels": [16, 32, 64, 128], "unet_strides": [2, 2, 2]})
    size = 64 if args.tiny else 128
    pre = ahm.pretrain(PretrainConfig(data={"path": str(data), "image_size": size}, model=model,
                                      masking={"policy": "ahm", "agent_workers": 0},
                                      train={"steps": 4 if args.tiny else 400, "batch_size": 4 if args.tiny else 32}),
                       out=args.out / "pre", force=True)
    print(f"pretrained: final loss {pre.final_loss:.4f} -> {pre.encoder}")

    seg = ahm.finetune(FinetuneConfig(data={"path": str(data)}, labels_fraction=0.1,
                                      train={"steps": 4 if args.tiny else 600, "batch_size": 4 if args.tiny else 8}),
                       out=args.out / "seg", init=pre.run_dir, force=True)
    print(f"fine-tuned: best validation Dice {seg.best_val_dice:.3f}")

    scores = ahm.evaluate(seg.run_dir, split="test", report=False)
    print(f"test: dataset-level Dice {scores.metrics['dataset_dice']:.3f} ({scores.out_dir})")

    image = sorted((data / "images").glob("*.png"))[0]
    masks = ahm.predict(seg.run_dir, [image], out=args.out / "masks", force=True)
    print(f"predicted: {len(masks.outputs)} mask(s) in {masks.out_dir}")

    model = ahm.load_segmenter(seg.run_dir)  # a plain MONAI module, for your own inference
    print(f"segmenter: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
