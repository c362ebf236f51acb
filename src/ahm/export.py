"""`ahm export`: a pretraining run's weights in another framework's checkpoint format.

    export_run(run_dir, "nnunet", out)   # the file `nnUNetv2_train ... -pretrained_weights out` loads
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ahm.errors import AhmError
from ahm.io import load_safetensors, safetensors_metadata, save_torch, write_text

TARGETS = ("nnunet",)


def notes_path(out: Path) -> Path:
    """The text file beside an export naming the plans and configuration it matches."""
    return out.with_name(out.name + ".txt")


def export_run(run_dir: str | Path, to: str, out: str | Path, plans: str | Path | None = None,
               configuration: str | None = None, force: bool = False) -> dict[str, Any]:
    """Write run `run_dir`'s pretrained network as `to`'s checkpoint at `out`; every check comes before writing."""
    if to not in TARGETS:
        raise AhmError(f"--to {to!r}: choose {', '.join(TARGETS)}")
    run = Path(run_dir).expanduser()
    out = Path(out).expanduser()
    encoder = run / "encoder.safetensors"
    if not run.is_dir():
        raise AhmError(f"{run}: run directory not found")
    if not encoder.is_file():
        raise AhmError(f"{encoder}: not found; export a finished pretraining run")
    for path in (out, notes_path(out)):
        if path.exists() and not force:
            raise AhmError(f"{path}: exists; pass --force to replace it")
    if out.is_dir():
        raise AhmError(f"{out}: is a folder; --out names the checkpoint file to write")
    return _to_nnunet(run, encoder, out, plans, configuration)


def _to_nnunet(run: Path, encoder: Path, out: Path, plans_arg: str | Path | None,
               configuration: str | None) -> dict[str, Any]:
    from ahm.nnunet import body_weights, build_network, first_difference, read_plans, resolve_configuration

    meta = safetensors_metadata(encoder)
    if meta.get("backbone") != "nnunet":
        raise AhmError(f"{encoder}: pretrained with backbone {meta.get('backbone')!r}; --to nnunet needs a run "
                       "pretrained with --backbone nnunet")
    run_config = meta["nnunet_configuration"]
    trained = json.loads(meta["nnunet_resolved"])
    configuration = configuration or run_config
    plans_path = Path(plans_arg).expanduser() if plans_arg else Path(meta["nnunet_plans"])
    if not plans_path.is_file():
        raise AhmError(f"{plans_path}: the run's plans file is gone; give the plans with --plans")
    plans = read_plans(plans_path)
    given = resolve_configuration(plans, configuration, plans_path)
    differs = first_difference(trained, given)
    if differs is not None:
        raise AhmError(f"{plans_path}: configuration {configuration!r} differs from the run's ({run_config!r} of "
                       f"{meta['nnunet_plans']}) at {differs}")
    weights = load_safetensors(encoder)
    # nnU-Net's own network for these plans: its loader requires each of these keys with this shape
    target = body_weights(build_network(plans, configuration, int(meta["in_channels"]), 2).state_dict())
    for key, value in target.items():
        if key not in weights:
            raise AhmError(f"{encoder}: has no {key}, which nnU-Net's network for {plans_path.name} "
                           f"{configuration!r} needs")
        if tuple(weights[key].shape) != tuple(value.shape):
            raise AhmError(f"{encoder}: {key} has shape {tuple(weights[key].shape)}, nnU-Net's network needs "
                           f"{tuple(value.shape)}")
    network_weights = {k: weights[k].contiguous() for k in target}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_torch(out, {"network_weights": network_weights,
                     "ahm": {"run": str(run.resolve()), "plans": str(plans_path.resolve()),
                             "configuration": configuration, "digest": meta["nnunet_digest"]}})
    write_text(notes_path(out), (
        f"ahm pretraining run {run.resolve()}\n"
        f"plans: {plans_path.resolve()}\n"
        f"configuration: {configuration}\n"
        f"input channels: {meta['in_channels']}\n"
        f"fine-tune: nnUNetv2_train DATASET {configuration} FOLD -p {plans.get('plans_name', 'nnUNetPlans')} "
        f"-pretrained_weights {out.resolve()}\n"))
    return {"out": str(out), "tensors": len(network_weights), "configuration": configuration,
            "plans": str(plans_path)}
