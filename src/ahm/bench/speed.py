"""`ahm bench speed`: pretraining step throughput of each masking policy against MONAI's own model of the same size.

The ViT backbone is measured against MONAI's `MaskedAutoEncoderViT` built with exactly our encoder and decoder
sizes (width, depth, heads, MLP); the UNet backbone against a plain step of the same MONAI `UNet` with a pixel
MSE on the unmasked image, the cost floor of masked-input pretraining. The sizes in the document are read off
the built modules, for ours and for the reference. All candidates run in one process with the same input (an image
in 2D, a crop of `data.crop_size` voxels in 3D, `data.spatial_dims`), batch and thread count. Rounds are
interleaved (policy A, B, ..., reference; then again) so drift on a shared machine hits all of them alike; the
figure is the median of the timed steps after warm-up.

Precision and compilation (`train.precision`, `train.compile`) apply to every candidate alike and as the training
loop applies them: the model is compiled with `torch.compile`, and its forward pass runs under Lightning's
mixed-precision plugin, the one Fabric wraps a training model in (inputs cast to bfloat16, autocast, outputs back
to float32), with the loss and the optimiser step outside it; a policy's own networks run under the same autocast.
Warm-up steps take the compilation.

Peak memory: on a GPU `torch.cuda.max_memory_allocated` over each block of steps; on the CPU the resident set
size read from /proc/self/statm every 5 ms during the block (`peak_mem_mib`, the whole process) and that peak
less the size at the block's start (`peak_growth_mib`, what the steps added). tracemalloc and
`resource.getrusage` do not serve: the first does not see torch's allocator, the second keeps the process's
lifetime peak. An allocator that keeps freed pages can hide part of a later candidate's growth.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from ahm.config import PretrainConfig
from ahm.errors import AhmError
from ahm.masking.base import policy_names


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


class _PeakSampler:
    """Peak resident memory while a block runs (CPU), or peak CUDA allocation on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0.0
        self.start = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> _PeakSampler:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.peak = self.start = _rss_mib()

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

    @property
    def growth(self) -> float:
        return max(0.0, self.peak - self.start)


MEMORY_MEASURES = {
    "cuda": "torch.cuda.max_memory_allocated over each block of steps (MiB); growth: less the allocation at its start",
    "cpu": "peak resident set size (/proc/self/statm, sampled every 5 ms) over each block of steps (MiB); "
           "growth: less the size at its start",
}


@dataclass
class _Candidate:
    name: str
    step: Callable[[torch.Tensor, float], None]
    close: Callable[[], None]
    times: list[float]
    peak_mib: float = 0.0
    growth_mib: float = 0.0
    policy_parameters: int = 0
    staged: bool = False
    stage_names: list[str] = field(default_factory=list)  # the stage of each step taken (warm-up first)


SPEED_PRECISIONS = ("32-true", "bf16-mixed")


def check_speed_precision(precision: str) -> str:
    """`train.precision` as `ahm bench speed` times it ("32" is 32-true), or a one-line refusal."""
    name = "32-true" if precision == "32" else precision
    if name not in SPEED_PRECISIONS:
        raise AhmError(f"--precision {precision}: `ahm bench speed` times {' or '.join(SPEED_PRECISIONS)}")
    return name


def _mixed_precision(cfg: PretrainConfig, device: torch.device):
    """Lightning's plugin for a mixed `train.precision`, the one Fabric runs a training model under; None for
    32-true."""
    if check_speed_precision(cfg.train.precision) == "32-true":
        return None
    from lightning.fabric.plugins.precision import MixedPrecision

    return MixedPrecision(cfg.train.precision, device=device.type)


def training_forward(model: torch.nn.Module, cfg: PretrainConfig, device: torch.device) -> Callable[..., Any]:
    """`model`'s forward as the training loop runs it: compiled with `train.compile`, and with a mixed
    `train.precision` as Fabric's wrapper runs it (`lightning.fabric.wrappers._FabricModule.forward`)."""
    forward = torch.compile(model) if cfg.train.compile else model
    plugin = _mixed_precision(cfg, device)
    if plugin is None:
        return forward

    def mixed(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = plugin.convert_input((args, kwargs))
        with plugin.forward_context():
            out = forward(*args, **kwargs)
        return plugin.convert_output(out)

    return mixed


def training_autocast(cfg: PretrainConfig, device: torch.device) -> Callable[[], AbstractContextManager]:
    """The context the training loop gives a policy for its own networks (Fabric's `autocast`)."""
    plugin = _mixed_precision(cfg, device)
    return plugin.forward_context if plugin is not None else contextlib.nullcontext


def trainable_parameters(module: torch.nn.Module) -> int:
    """Parameters the optimiser updates (requires_grad), counted once each."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def vit_mae_setting(encoder_blocks, encoder_norm: torch.nn.LayerNorm, decoder_embed: torch.nn.Linear,
                    decoder_blocks, parameters: int) -> dict[str, Any]:
    """Encoder and decoder sizes read off the built modules (not the config), and the trainable parameters."""
    first, dec = encoder_blocks[0], decoder_blocks[0]
    return {
        "hidden_size": encoder_norm.normalized_shape[0], "mlp_dim": first.mlp.linear1.out_features,
        "num_layers": len(encoder_blocks), "num_heads": first.attn.num_heads,
        "decoder_dim": decoder_embed.out_features, "decoder_depth": len(decoder_blocks),
        "decoder_heads": dec.attn.num_heads, "decoder_mlp_dim": dec.mlp.linear1.out_features,
        "parameters": parameters,
    }


def unet_setting(net, parameters: int) -> dict[str, Any]:
    """A MONAI UNet's sizes as built, and the trainable parameters."""
    return {"unet_network": getattr(net, "network", "unet"), "unet_channels": list(net.channels),
            "unet_strides": list(net.strides), "unet_num_res_units": net.num_res_units, "parameters": parameters}


def _model_setting(model) -> dict[str, Any]:
    return SPEED_REFERENCES[model.backbone].model_setting(model)


def _vit_model_setting(model) -> dict[str, Any]:
    return vit_mae_setting(model.encoder.blocks, model.encoder.norm, model.decoder_embed, model.decoder_blocks,
                           trainable_parameters(model))


def _unet_model_setting(model) -> dict[str, Any]:
    return unet_setting(model.net, trainable_parameters(model))


def _policy_candidate(name: str, cfg: PretrainConfig, channels: int, device: torch.device,
                      total: int) -> tuple[_Candidate, dict[str, Any]]:
    from ahm.masking import PolicyContext, build_policy
    from ahm.models import build_mim_model
    from ahm.pipeline import pipeline_for
    from ahm.train.pretrain import build_optimizer, forward_step

    policy_name, _, variant = (name, "", "") if name in policy_names() else name.partition("-")
    masking = cfg.masking.model_copy(update={"policy": policy_name})
    if variant == "async":
        masking = masking.model_copy(update={"agent_workers": max(1, cfg.masking.agent_workers or 2)})
    elif policy_name == "ahm":
        masking = masking.model_copy(update={"agent_workers": 0})
    run_cfg = cfg.model_copy(update={"masking": masking})
    torch.manual_seed(0)
    model = build_mim_model(cfg.model, pipeline_for(cfg).model_input_size(cfg.data), channels,
                            spatial_dims=cfg.data.spatial_dims).to(device)
    policy = build_policy(masking, PolicyContext(grid=model.patch_grid, in_channels=channels, total_steps=total,
                                                 seed=0, device=device, model=model,
                                                 autocast=training_autocast(cfg, device)))
    policy.to(device)
    optimizer, policy_params = build_optimizer(model, policy, run_cfg)
    # the policy keeps the plain model (its context's), as in the training loop
    forward = training_forward(model, cfg, device)

    stage_names: list[str] = []

    def step(images: torch.Tensor, progress: float) -> None:
        # a staged policy (ahm-official) runs each stage as the loop would: a frozen-model stage has no model update
        stage = policy.stage_at(int(round(progress * total)))
        stage_names.append(stage.name)
        model.train(stage.trains_model)
        # the loop's common step: one that is not logged computes no diagnostics
        loss, _, _ = forward_step(forward, policy, images, progress, stage.trains_model, logged=False)
        if not stage.trains_model:
            return
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()

    cand = _Candidate(name, step, policy.close, [], policy_parameters=trainable_parameters(policy),
                      staged=len(policy.stages()) > 1, stage_names=stage_names)
    return cand, _model_setting(model)


def _optimizer_step(model: torch.nn.Module, loss: torch.Tensor, optimizer, clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


def _reference_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    from ahm.train.loop import adamw_kernel

    # the same optimiser implementation as ours (AdamW, same kernel), one group: weight-decay groups cost nothing
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.05,
                             **adamw_kernel(model))


def _mae_reference(cfg: PretrainConfig, channels: int, device: torch.device):
    """MONAI's MaskedAutoEncoderViT with our encoder and decoder sizes; MSE on the masked patches."""
    from monai.networks.nets import MaskedAutoEncoderViT

    from ahm.models.mae import freeze_unused_norms
    from ahm.pipeline import pipeline_for

    dims, dec = cfg.model.vit_dims(), cfg.model.decoder_dims()
    pipeline = pipeline_for(cfg)
    pipeline.check_mae_reference((("--model", dims["hidden_size"]), ("--decoder-dim", dec["decoder_dim"])))
    torch.manual_seed(0)
    model = MaskedAutoEncoderViT(
        in_channels=channels, img_size=pipeline.model_input_size(cfg.data), patch_size=cfg.model.patch_size,
        hidden_size=dims["hidden_size"], mlp_dim=dims["mlp_dim"], num_layers=dims["num_layers"],
        num_heads=dims["num_heads"], masking_ratio=cfg.masking.mask_ratio, spatial_dims=cfg.data.spatial_dims,
        decoder_hidden_size=dec["decoder_dim"], decoder_num_layers=dec["decoder_depth"],
        decoder_num_heads=dec["decoder_heads"], decoder_mlp_dim=dec["decoder_mlp_dim"],
    ).to(device)
    freeze_unused_norms(model)  # as ours: the never-used cross-attention norms are not optimiser parameters
    if check_speed_precision(cfg.train.precision) != "32-true":
        # MONAI writes the decoder's embedding into a float32 sequence of mask tokens by index_put, which refuses
        # the bfloat16 that autocast makes; ours concatenates the two, which promotes to float32: the same here
        model.decoder_embed.register_forward_hook(lambda module, args, output: output.float())
    optimizer = _reference_optimizer(model, cfg)
    forward = training_forward(model, cfg, device)
    p = cfg.model.patch_size

    def step(images: torch.Tensor, progress: float) -> None:  # noqa: ARG001
        pred, mask = forward(images)
        b, c, *spatial = images.shape
        n = len(spatial)
        # MONAI's patch order: patches row-major over the axes, each flattened as (p, ..., p, c)
        split = [d for size in spatial for d in (size // p, p)]
        order = (0, *range(2, 2 + 2 * n, 2), *range(3, 3 + 2 * n, 2), 1)
        target = images.reshape(b, c, *split).permute(*order).reshape(b, -1, p**n * c)
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        _optimizer_step(model, loss, optimizer, cfg.train.clip_grad)

    blocks = list(model.blocks)
    setting = vit_mae_setting(blocks[:-1], blocks[-1], model.decoder_embed, list(model.decoder_blocks)[:-1],
                              trainable_parameters(model))
    return _Candidate(MAE_REFERENCE_NAME, step, lambda: None, []), setting


def _unet_reference(cfg: PretrainConfig, channels: int, device: torch.device):
    """The same MONAI U-Net as our MaskedUNet's (`model.unet_network`), trained to reproduce its unmasked input
    (pixel MSE): the cost floor of masked-input pretraining."""
    from ahm.models.norm import fast_instance_norms
    from ahm.models.unet_mim import unet_memory_format
    from ahm.models.unet_nets import build_unet_network

    torch.manual_seed(0)
    dims = cfg.data.spatial_dims
    model = build_unet_network(cfg.model, channels, channels, dims).to(device)
    # as in MaskedUNet: the same network in the same memory format (channels-last in 2D, plain in 3D), so the
    # ratio is the cost of the masking and the per-patch loss
    fast_instance_norms(model)
    memory_format = unet_memory_format(dims)
    model.to(memory_format=memory_format)
    optimizer = _reference_optimizer(model, cfg)
    forward = training_forward(model, cfg, device)

    def step(images: torch.Tensor, progress: float) -> None:  # noqa: ARG001
        x = images.contiguous(memory_format=memory_format)
        loss = torch.nn.functional.mse_loss(forward(x), x)
        _optimizer_step(model, loss, optimizer, cfg.train.clip_grad)

    return _Candidate(UNET_REFERENCE_NAME, step, lambda: None, []), unet_setting(model, trainable_parameters(model))


MAE_REFERENCE_NAME = "monai.networks.nets.MaskedAutoEncoderViT"
UNET_REFERENCE_NAME = "monai.networks.nets.UNet or BasicUNet (model.unet_network; pixel MSE, unmasked)"


def _describe_vit(s: dict[str, Any]) -> str:
    return (f"encoder {s['hidden_size']} wide, {s['num_layers']} layers, {s['num_heads']} heads, MLP {s['mlp_dim']}; "
            f"decoder {s['decoder_dim']} wide, {s['decoder_depth']} layers, {s['decoder_heads']} heads, "
            f"MLP {s['decoder_mlp_dim']}; {s['parameters']:,} parameters")


def _describe_unet(s: dict[str, Any]) -> str:
    return (f"{s.get('unet_network', 'unet')} channels {tuple(s['unet_channels'])}, strides {tuple(s['unet_strides'])}, "
            f"{s['unet_num_res_units']} res units; {s['parameters']:,} parameters")


@dataclass(frozen=True)
class SpeedReference:
    """What `ahm bench speed` measures a backbone against: MONAI's own model of the same size."""

    build: Callable[..., tuple[_Candidate, dict[str, Any]]]  # (cfg, channels, device) -> candidate, its setting
    name: str
    label: str
    model_setting: Callable[[Any], dict[str, Any]]  # our MIM model's sizes as built
    describe: Callable[[dict[str, Any]], str]  # one line of a setting
    names_preset: bool = False  # model.preset names the model's size


# By backbone name (`model.backbone`): a backbone without an entry has no speed reference.
SPEED_REFERENCES: dict[str, SpeedReference] = {
    "vit": SpeedReference(_mae_reference, MAE_REFERENCE_NAME, "MONAI MAE", _vit_model_setting, _describe_vit,
                          names_preset=True),
    "unet": SpeedReference(_unet_reference, UNET_REFERENCE_NAME, "MONAI UNet", _unet_model_setting, _describe_unet),
}


# "cpu" counts the process's CPU seconds (every thread's), so with more than one thread it sums their work
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _synthetic_batch(batch: int, channels: int, size: int | tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth blobs on a dark background: image-like statistics (empty border, structured middle); `size` is the
    square image side, or the shape of a volume."""
    g = torch.Generator().manual_seed(seed)
    shape = (size, size) if isinstance(size, int) else tuple(size)
    n = len(shape)
    coords = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in shape), indexing="ij")
    imgs = torch.zeros(batch, channels, *shape)
    scale, shift = torch.tensor([1.2] * n + [0.4]), torch.tensor([0.6] * n + [-0.1])
    for i in range(batch):
        for _ in range(4):
            *centre, r = torch.rand(n + 1, generator=g) * scale - shift
            imgs[i] += torch.exp(-sum((x - c) ** 2 for x, c in zip(coords, centre)) / (2 * r**2))
        imgs[i] += 0.05 * torch.rand(channels, *shape, generator=g)
    return (imgs / imgs.amax(dim=tuple(range(1, 2 + n)), keepdim=True)).clamp(0, 1)


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _profile_rows(cand: _Candidate, images: torch.Tensor, progress: float, rows: int) -> str:
    """torch.profiler's table of one step, the `rows` operators with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cand.step(images, progress)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run_speed(cfg: PretrainConfig, policies: list[str] | None = None, channels: int = 1, steps: int = 8,
              warmup: int = 3, rounds: int = 3, threads: int | None = None,
              progress: Callable[[str], None] | None = None, profile_rows: int = 0,
              clock: str = "wall") -> dict[str, Any]:
    """Measure images/s (volumes/s with `data.spatial_dims` 3, on crops of `data.crop_size`) per policy and for the
    MONAI reference of the backbone; returns the `--json` document.

    Each figure is the median over all timed steps; `ratio` is the median over rounds of (our median / the
    reference's median in the same round), with the rounds' lowest and highest beside it. `clock` "cpu" times
    each step in this process's CPU seconds (CPU device only): on a machine shared with other jobs they move far
    less than wall time, which counts the time the step waited for a core.
    """
    known = policy_names() + ["ahm-async"]
    names = policies or known
    for name in names:
        if name not in known:
            raise AhmError(f"--policies: unknown policy {name!r}; choose from {', '.join(known)}")
    backbone = cfg.model.backbone
    if backbone not in SPEED_REFERENCES:
        raise AhmError(f"--backbone: no speed reference for {backbone!r}; choose {', '.join(SPEED_REFERENCES)}")
    reference = SPEED_REFERENCES[backbone]
    if clock not in CLOCKS:
        raise AhmError(f"--clock: unknown clock {clock!r}; choose {' or '.join(CLOCKS)}")
    precision = check_speed_precision(cfg.train.precision)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.accelerator != "cpu" else "cpu")
    if clock == "cpu" and device.type != "cpu":
        raise AhmError("--clock cpu: CPU seconds do not measure a step on the GPU; use --clock wall there")
    import math

    from ahm.models.backbones import get_backbone
    from ahm.pipeline import pipeline_for

    dims = cfg.data.spatial_dims
    pipeline = pipeline_for(cfg)
    # as pretraining checks it: whole patches, and for the UNet whole feature maps at every stride (3D)
    pipeline.check_model_input(
        cfg.data, lambda: math.lcm(cfg.model.patch_size, get_backbone(backbone).crop_multiple(cfg.model)),
        why=f"--patch-size {cfg.model.patch_size} (and the backbone's strides)")
    now = CLOCKS[clock]
    images = _synthetic_batch(cfg.train.batch_size, channels, pipeline.model_input_size(cfg.data)).to(device)
    total = warmup + rounds * steps
    candidates: list[_Candidate] = []
    load_start = _load()
    ours: dict[str, Any] = {}
    profiles: dict[str, str] = {}
    try:
        for name in names:
            cand, ours = _policy_candidate(name, cfg, channels, device, total)
            candidates.append(cand)
        ref, ref_setting = reference.build(cfg, channels, device)
        candidates.append(ref)
        for cand in candidates:
            if progress:
                progress(f"warming up {cand.name}")
            gc.collect()
            with _PeakSampler(device) as sampler:
                for i in range(warmup):
                    cand.step(images, i / total)
            cand.peak_mib, cand.growth_mib = sampler.peak, sampler.growth
        for r in range(rounds):
            for cand in candidates:
                if progress:
                    progress(f"round {r + 1}/{rounds}: {cand.name}")
                with _PeakSampler(device) as sampler:
                    for i in range(steps):
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        t0 = now()
                        cand.step(images, (warmup + r * steps + i) / total)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        cand.times.append(now() - t0)
                cand.peak_mib = max(cand.peak_mib, sampler.peak)
                cand.growth_mib = max(cand.growth_mib, sampler.growth)
        if profile_rows > 0:
            for cand in candidates:
                if progress:
                    progress(f"profiling {cand.name}")
                profiles[cand.name] = _profile_rows(cand, images, 1.0, profile_rows)
    finally:
        for cand in candidates:
            cand.close()

    bs = cfg.train.batch_size

    def rate(c: _Candidate) -> float:
        return bs / _median(c.times)

    def round_rates(c: _Candidate) -> list[float]:
        return [bs / _median(c.times[r * steps:(r + 1) * steps]) for r in range(rounds)]

    ref_rounds = round_rates(ref)
    setting = {
        "backbone": backbone, "model": cfg.model.preset if reference.names_preset else None, **ours,
        "image_size": cfg.data.image_size, "spatial_dims": dims,
        **pipeline.speed_input(cfg.data), "input_shape": list(images.shape[2:]),
        "memory": MEMORY_MEASURES[device.type],
        "patch_size": cfg.model.patch_size, "batch_size": bs,
        "mask_ratio": cfg.masking.mask_ratio, "norm": cfg.model.norm, "channels": channels,
        "threads": torch.get_num_threads(), "device": str(device), "precision": precision,
        "compile": bool(cfg.train.compile), "clock": clock, "timed_steps": rounds * steps,
        "rounds": rounds, "load_1min": [load_start, _load()],
    }
    doc: dict[str, Any] = {
        "reference": {"name": reference.name, "images_per_s": rate(ref), "peak_mem_mib": ref.peak_mib,
                      "peak_growth_mib": ref.growth_mib,
                      "images_per_s_rounds": ref_rounds, "setting": ref_setting},
        "policies": {},
        "setting": setting,
    }
    for c in candidates:
        if c is ref:
            continue
        ratios = [a / b for a, b in zip(round_rates(c), ref_rounds)]
        doc["policies"][c.name] = {
            "images_per_s": rate(c), "ratio": _median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "images_per_s_rounds": round_rates(c), "peak_mem_mib": c.peak_mib, "peak_growth_mib": c.growth_mib,
            "policy_parameters": c.policy_parameters,
        }
        if c.staged:
            # the timed steps follow the stage layout over warm-up + timed steps; the mean rate over them carries
            # the staged overhead (frozen-model agent steps, hardness probes) that a median would hide
            timed = c.stage_names[warmup:]
            per_stage: dict[str, list[float]] = {}
            for stage_name, seconds in zip(timed, c.times):
                per_stage.setdefault(stage_name, []).append(seconds)
            doc["policies"][c.name]["mean_images_per_s"] = bs * len(c.times) / sum(c.times)
            doc["policies"][c.name]["stages"] = {
                stage_name: bs * len(times) / sum(times) for stage_name, times in per_stage.items()}
    if profiles:
        doc["profiles"] = profiles
    return doc


def format_speed(doc: dict[str, Any]) -> str:
    s = doc["setting"]
    backbone = s["backbone"]
    reference = SPEED_REFERENCES[backbone]
    label = reference.label
    load = ", ".join("?" if v is None else f"{v:.2f}" for v in s.get("load_1min", []))
    unit = s.get("unit", "images/s")
    from ahm.pipeline import for_dims

    where, rate = for_dims(s.get("spatial_dims", 2)).speed_where(s)
    lines = [
        f"pretraining step throughput: {backbone}{' ' + s['model'] if s.get('model') else ''}, {where}, patch {s['patch_size']}, "
        f"batch {s['batch_size']}, mask {s['mask_ratio']}, {s['channels']} channel(s), {s['threads']} threads, "
        f"{s['device']}, {s.get('precision', '32-true')}, compile {'on' if s.get('compile') else 'off'}, "
        f"{s.get('clock', 'wall')} clock; median of {s['timed_steps']} steps in {s['rounds']} interleaved rounds; "
        f"load (1 min) at start, end: {load}",
        f"  ours:      {reference.describe(s)}",
        f"  {label + ':':<10} {reference.describe(doc['reference']['setting'])}",
        "",
        f"| {'policy':<10} | {unit:>9} | {'x ' + label:>12} | {'rounds min-max':>14} | {'x random':>8} "
        f"| {'peak MiB':>8} | {'growth MiB':>10} |",
        f"|{'-' * 12}|{'-' * 11}|{'-' * 14}|{'-' * 16}|{'-' * 10}|{'-' * 10}|{'-' * 12}|",
    ]
    rand = doc["policies"].get("random", {}).get("images_per_s")
    for name, row in doc["policies"].items():
        vs_random = f"{row['images_per_s'] / rand:.2f}" if rand else "-"
        spread = f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"
        lines.append(f"| {name:<10} | {row['images_per_s']:>9{rate}} | {row['ratio']:>12.2f} | {spread:>14} | "
                     f"{vs_random:>8} | {row['peak_mem_mib']:>8.0f} | {row.get('peak_growth_mib', 0.0):>10.0f} |")
    ref = doc["reference"]
    lines.append(f"| {label:<10} | {ref['images_per_s']:>9{rate}} | {1.0:>12.2f} | {'-':>14} | {'-':>8} "
                 f"| {ref['peak_mem_mib']:>8.0f} | {ref.get('peak_growth_mib', 0.0):>10.0f} |")
    if s.get("memory"):
        lines.append(f"memory: {s['memory']}")
    for name, row in doc["policies"].items():
        if "stages" in row:
            parts = ", ".join(f"{stage} {value:.1f}" for stage, value in row["stages"].items())
            lines.append(f"{name}: {row['mean_images_per_s']:{rate}} {unit} over all its timed steps, staged "
                         f"overhead included ({parts})")
    for name, table in doc.get("profiles", {}).items():
        lines += ["", f"profile of one step: {name}", table]
    return "\n".join(lines)
