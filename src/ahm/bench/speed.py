"""`ahm bench speed`: pretraining step throughput of each masking policy against MONAI's MaskedAutoEncoderViT.

All candidates run in one process with the same ViT size, image size, batch and thread count. Rounds are
interleaved (policy A, B, ..., reference; then again) so drift on a shared machine hits all of them alike; the
figure is the median of the timed steps after warm-up.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ahm.config import PretrainConfig
from ahm.errors import AhmError
from ahm.masking.base import policy_names

REFERENCE = "monai-mae"


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


class _PeakSampler:
    """Peak resident memory while a block runs (CPU), or peak CUDA allocation on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "_PeakSampler":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.peak = _rss_mib()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_mib())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


@dataclass
class _Candidate:
    name: str
    step: Callable[[torch.Tensor, float], None]
    close: Callable[[], None]
    times: list[float]
    peak_mib: float = 0.0
    staged: bool = False
    stage_names: list[str] = field(default_factory=list)  # the stage of each step taken (warm-up first)


def _policy_candidate(name: str, cfg: PretrainConfig, channels: int, device: torch.device, total: int) -> _Candidate:
    from ahm.masking import PolicyContext, build_policy
    from ahm.models import build_mim_model
    from ahm.train.pretrain import build_optimizer, forward_step

    policy_name, _, variant = (name, "", "") if name in policy_names() else name.partition("-")
    masking = cfg.masking.model_copy(update={"policy": policy_name})
    if variant == "async":
        masking = masking.model_copy(update={"agent_workers": max(1, cfg.masking.agent_workers or 2)})
    elif policy_name == "ahm":
        masking = masking.model_copy(update={"agent_workers": 0})
    run_cfg = cfg.model_copy(update={"masking": masking})
    torch.manual_seed(0)
    model = build_mim_model(cfg.model, cfg.data.image_size, channels).to(device)
    policy = build_policy(masking, PolicyContext(grid=model.grid, patch_size=model.patch_size, in_channels=channels,
                                                 total_steps=total, seed=0, device=device, model=model))
    policy.to(device)
    optimizer, policy_params = build_optimizer(model, policy, run_cfg)

    stage_names: list[str] = []

    def step(images: torch.Tensor, progress: float) -> None:
        # a staged policy (ahm-official) runs each stage as the loop would: a frozen-model stage has no model update
        stage = policy.stage_at(int(round(progress * total)))
        stage_names.append(stage.name)
        model.train(stage.trains_model)
        loss, _, _ = forward_step(model, policy, images, progress, stage.trains_model)
        if not stage.trains_model:
            return
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()

    return _Candidate(name, step, policy.close, [], staged=len(policy.stages()) > 1, stage_names=stage_names)


def _reference_candidate(cfg: PretrainConfig, channels: int, device: torch.device) -> _Candidate:
    from monai.networks.nets import MaskedAutoEncoderViT

    dims = cfg.model.vit_dims()
    torch.manual_seed(0)
    model = MaskedAutoEncoderViT(
        in_channels=channels, img_size=cfg.data.image_size, patch_size=cfg.model.patch_size,
        hidden_size=dims["hidden_size"], mlp_dim=dims["mlp_dim"], num_layers=dims["num_layers"],
        num_heads=dims["num_heads"], masking_ratio=cfg.masking.mask_ratio, spatial_dims=2,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.05,
                                  foreach=True)  # the same optimiser implementation as ours
    p = cfg.model.patch_size

    def step(images: torch.Tensor, progress: float) -> None:  # noqa: ARG001
        pred, mask = model(images)
        b, c, h, w = images.shape
        target = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()

    return _Candidate(REFERENCE, step, lambda: None, [])


def _synthetic_batch(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth blobs on a dark background: image-like statistics (empty border, structured middle)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = torch.zeros(batch, channels, size, size)
    for i in range(batch):
        for _ in range(4):
            cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([1.2, 1.2, 0.4]) - torch.tensor([0.6, 0.6, -0.1]))
            imgs[i] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        imgs[i] += 0.05 * torch.rand(channels, size, size, generator=g)
    return (imgs / imgs.amax(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)


def run_speed(cfg: PretrainConfig, policies: Optional[list[str]] = None, channels: int = 1, steps: int = 8,
              warmup: int = 3, rounds: int = 3, threads: Optional[int] = None,
              progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Measure images/s per policy and for the MONAI reference; returns the `--json` document."""
    known = policy_names() + ["ahm-async"]
    names = policies or known
    for name in names:
        if name not in known:
            raise AhmError(f"--policies: unknown policy {name!r}; choose from {', '.join(known)}")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.accelerator != "cpu" else "cpu")
    images = _synthetic_batch(cfg.train.batch_size, channels, cfg.data.image_size).to(device)
    total = warmup + rounds * steps
    candidates: list[_Candidate] = []
    try:
        for name in names:
            candidates.append(_policy_candidate(name, cfg, channels, device, total))
        candidates.append(_reference_candidate(cfg, channels, device))
        for cand in candidates:
            if progress:
                progress(f"warming up {cand.name}")
            gc.collect()
            with _PeakSampler(device) as sampler:
                for i in range(warmup):
                    cand.step(images, i / total)
            cand.peak_mib = sampler.peak
        for r in range(rounds):
            for cand in candidates:
                if progress:
                    progress(f"round {r + 1}/{rounds}: {cand.name}")
                with _PeakSampler(device) as sampler:
                    for i in range(steps):
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        t0 = time.perf_counter()
                        cand.step(images, (warmup + r * steps + i) / total)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        cand.times.append(time.perf_counter() - t0)
                cand.peak_mib = max(cand.peak_mib, sampler.peak)
    finally:
        for cand in candidates:
            cand.close()

    def rate(c: _Candidate) -> float:
        s = sorted(c.times)
        return cfg.train.batch_size / s[len(s) // 2]

    ref = next(c for c in candidates if c.name == REFERENCE)
    ref_rate = rate(ref)
    doc: dict[str, Any] = {
        "reference": {"name": "monai.networks.nets.MaskedAutoEncoderViT", "images_per_s": ref_rate,
                      "peak_mem_mib": ref.peak_mib},
        "policies": {},
        "setting": {
            "model": cfg.model.preset, **cfg.model.vit_dims(), "image_size": cfg.data.image_size,
            "patch_size": cfg.model.patch_size, "batch_size": cfg.train.batch_size, "mask_ratio": cfg.masking.mask_ratio,
            "channels": channels, "threads": torch.get_num_threads(), "device": str(device),
            "timed_steps": rounds * steps, "backbone": cfg.model.backbone,
        },
    }
    for c in candidates:
        if c is ref:
            continue
        r = rate(c)
        doc["policies"][c.name] = {"images_per_s": r, "ratio": r / ref_rate, "peak_mem_mib": c.peak_mib}
        if c.staged:
            # the timed steps follow the stage layout over warm-up + timed steps; the mean rate over them carries
            # the staged overhead (frozen-model agent steps, hardness probes) that a median would hide
            timed = c.stage_names[warmup:]
            per_stage: dict[str, list[float]] = {}
            for stage_name, seconds in zip(timed, c.times):
                per_stage.setdefault(stage_name, []).append(seconds)
            doc["policies"][c.name]["mean_images_per_s"] = cfg.train.batch_size * len(c.times) / sum(c.times)
            doc["policies"][c.name]["stages"] = {
                stage_name: cfg.train.batch_size * len(times) / sum(times) for stage_name, times in per_stage.items()}
    return doc


def format_speed(doc: dict[str, Any]) -> str:
    s = doc["setting"]
    lines = [
        f"pretraining step throughput: {s['backbone']} {s['model']} ({s['hidden_size']} wide, {s['num_layers']} layers), "
        f"{s['image_size']}px, patch {s['patch_size']}, batch {s['batch_size']}, mask {s['mask_ratio']}, "
        f"{s['threads']} threads, {s['device']}; median of {s['timed_steps']} steps",
        "",
        f"| {'policy':<10} | {'images/s':>9} | {'x MONAI MAE':>11} | {'x random':>8} | {'peak MiB':>8} |",
        f"|{'-' * 12}|{'-' * 11}|{'-' * 13}|{'-' * 10}|{'-' * 10}|",
    ]
    rand = doc["policies"].get("random", {}).get("images_per_s")
    for name, row in doc["policies"].items():
        vs_random = f"{row['images_per_s'] / rand:.2f}" if rand else "-"
        lines.append(f"| {name:<10} | {row['images_per_s']:>9.1f} | {row['ratio']:>11.2f} | {vs_random:>8} | "
                     f"{row['peak_mem_mib']:>8.0f} |")
    ref = doc["reference"]
    lines.append(f"| {'MONAI MAE':<10} | {ref['images_per_s']:>9.1f} | {1.0:>11.2f} | {'-':>8} | {ref['peak_mem_mib']:>8.0f} |")
    for name, row in doc["policies"].items():
        if "stages" in row:
            parts = ", ".join(f"{stage} {value:.1f}" for stage, value in row["stages"].items())
            lines.append(f"{name}: {row['mean_images_per_s']:.1f} images/s over all its timed steps, staged "
                         f"overhead included ({parts})")
    return "\n".join(lines)
