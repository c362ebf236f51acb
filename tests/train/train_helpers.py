"""Tiny generated datasets and configs for training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ahm.train.engine import TrainHook


def make_blob_folder(root: Path, n: int = 12, size: int = 32, seed: int = 0, labels: bool = True) -> Path:
    """A `folder`-layout set of grayscale images with a bright disc (label 1) on a dark textured background."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if labels:
        (root / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        r = rng.integers(size // 8, size // 4)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = 40 + 20 * rng.random((size, size))
        img[disc] = 180 + 60 * rng.random(int(disc.sum()))
        stem = f"s{i // 2:02d}__{i % 2}"
        Image.fromarray(img.astype(np.uint8)).save(root / "images" / f"{stem}.png")
        if labels:
            Image.fromarray(disc.astype(np.uint8)).save(root / "masks" / f"{stem}.png")
    return root


def tiny_pretrain_overrides(data: Path, policy: str = "random", backbone: str = "vit", steps: int = 4) -> dict:
    return {
        "data": {"path": str(data), "image_size": 32, "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"backbone": backbone, "preset": "custom", "patch_size": 8, "hidden_size": 32, "mlp_dim": 64,
                  "num_layers": 2, "num_heads": 2, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2,
                  "unet_channels": [8, 16], "unet_strides": [2], "unet_num_res_units": 1},
        "masking": {"policy": policy, "agent_dim": 16, "agent_heads": 2},
        "train": {"steps": steps, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1,
                  "seed": 3, "accelerator": "cpu"},
    }


def ctrl_c_after(reads: int):
    """A stand-in for `stop_on_sigint`: its flag reads as a Ctrl-C from the `reads`-th time the loop asks (the loop
    asks once per step), so a run is interrupted at a known step without a real signal."""
    import contextlib

    class StopAfter(dict):
        def __init__(self) -> None:
            super().__init__(stop=False)
            self.reads = 0

        def __getitem__(self, key):
            self.reads += 1
            return self.reads >= reads

    @contextlib.contextmanager
    def fake_sigint():
        yield StopAfter()

    return fake_sigint


# ---------------------------------------------------------------------------------------------------------------
# Evidence of DDP semantics, installed by the tests that check them: the engine's `TrainHook` extension point.

MAX_SEEN = 4096  # entries per rank kept as evidence of disjoint DDP shards (rank_samples.json)


def weights_fingerprint(model, policy):
    """Order-sensitive sums of every parameter, float64: equal across ranks iff they trained in lock-step."""
    import torch

    values = []
    for module in (model, policy):
        for i, p in enumerate(module.parameters()):
            flat = p.detach().double().reshape(-1)
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
            values.append(flat.sum() + (flat * weights * 1e-6).sum() * (i + 1))
    return torch.stack(values)


class RankEvidence(TrainHook):
    """Under DDP, rank 0 writes rank_fingerprints.json (each rank's weights fingerprint: model under DDP, policy
    by all-reduced gradients), rank_samples.json (the corpus entries each rank trained on, the first MAX_SEEN)
    and summary["ranks_agree"]. Picklable, so `--devices N` takes it into its processes."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_batch(self, run, batch) -> None:
        if len(self.seen) < MAX_SEEN:
            self.seen.extend(batch["entry"])

    def on_end(self, run, summary) -> None:
        import torch

        from ahm.io import write_json

        fabric, world = run.fabric, run.fabric.world_size
        if world == 1:
            return
        prints = fabric.all_gather(weights_fingerprint(run.raw_model, run.policy).to(fabric.device)).cpu()
        shown = torch.full((MAX_SEEN,), -1, dtype=torch.long)
        shown[:min(len(self.seen), MAX_SEEN)] = torch.tensor(self.seen[:MAX_SEEN], dtype=torch.long)
        entries = fabric.all_gather(shown.to(fabric.device)).cpu()
        if fabric.global_rank == 0:
            write_json(run.out / "rank_fingerprints.json", {str(r): prints[r].tolist() for r in range(world)})
            write_json(run.out / "rank_samples.json", {str(r): [int(k) for k in entries[r] if k >= 0]
                                                       for r in range(world)})
            summary["ranks_agree"] = bool((prints == prints[0]).all())
