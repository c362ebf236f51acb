"""`ahm bench speed`: the reference is MONAI's model at exactly our size, and the document says so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ahm.config import PretrainConfig, build_config
from ahm.errors import AhmError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import tiny_pretrain_overrides  # noqa: E402

SIZE_KEYS = ("hidden_size", "mlp_dim", "num_layers", "num_heads",
             "decoder_dim", "decoder_depth", "decoder_heads", "decoder_mlp_dim")


def _cfg(tmp: Path, backbone: str = "vit", **model) -> PretrainConfig:
    over = tiny_pretrain_overrides(tmp, backbone=backbone)
    over["model"].update(model)
    return build_config(PretrainConfig, overrides=over)


def _check_rows(doc: dict, names: set[str]) -> None:
    assert set(doc["policies"]) == names
    ref = doc["reference"]
    for row in doc["policies"].values():
        assert row["images_per_s"] > 0 and row["peak_mem_mib"] > 0
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        # ratio: median over rounds of (ours / reference) in the same round
        per_round = sorted(a / b for a, b in zip(row["images_per_s_rounds"], ref["images_per_s_rounds"]))
        assert row["ratio"] == pytest.approx(per_round[len(per_round) // 2])


@pytest.mark.parametrize("decoder", [{}, {"decoder_dim": 48, "decoder_depth": 3, "decoder_heads": 3,
                                          "decoder_mlp_dim": 40}])
def test_vit_reference_has_our_encoder_and_decoder(tmp_path: Path, decoder: dict) -> None:
    from ahm.bench.speed import format_speed, run_speed

    cfg = _cfg(tmp_path, **decoder)
    doc = run_speed(cfg, ["random", "block"], steps=1, warmup=1, rounds=3)
    assert doc["reference"]["name"].endswith("MaskedAutoEncoderViT")
    _check_rows(doc, {"random", "block"})
    ours, ref = doc["setting"], doc["reference"]["setting"]
    # every size read off the built modules agrees, and matches what was asked for
    assert {k: ours[k] for k in SIZE_KEYS} == {k: ref[k] for k in SIZE_KEYS}
    want = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "decoder_mlp_dim": 128} | decoder
    assert {k: ours[k] for k in want} == want
    # Parameters differ by exactly what the two designs differ in, nothing else:
    #   + L x hidden: our encoder's position table is trainable (UNETR fine-tunes it); MONAI's sin-cos is fixed
    #   + depth x 3 x decoder_dim: our decoder's qkv biases (MONAI has one qkv_bias flag, off as in our encoder)
    #   - hidden: MONAI's class token
    patches = (cfg.data.image_size // cfg.model.patch_size) ** 2
    expected = patches * ours["hidden_size"] + 3 * ours["decoder_depth"] * ours["decoder_dim"] - ours["hidden_size"]
    assert ours["parameters"] - ref["parameters"] == expected
    assert abs(expected) < 0.02 * ref["parameters"] + 3000  # small against the model at any realistic size
    text = format_speed(doc)
    assert "MONAI MAE" in text and f"decoder {ours['decoder_dim']} wide, {ours['decoder_depth']} layers" in text
    assert text.count(f"MLP {ours['decoder_mlp_dim']};") == 2  # both settings printed


@pytest.mark.parametrize("network", ["unet", "basic-unet"])
def test_unet_reference_is_the_same_unet(tmp_path: Path, network: str) -> None:
    from ahm.bench.speed import format_speed, run_speed

    sizes = ({"unet_channels": [8, 16], "unet_strides": [2], "unet_num_res_units": 1} if network == "unet" else
             {"unet_channels": [4, 4, 8, 8, 8], "unet_strides": [2, 2, 2, 2], "unet_num_res_units": 0})
    cfg = _cfg(tmp_path, backbone="unet", unet_network=network, **sizes)
    doc = run_speed(cfg, ["random"], steps=1, warmup=1, rounds=1)
    assert doc["reference"]["name"].startswith("monai.networks.nets.UNet")
    _check_rows(doc, {"random"})
    ours, ref = doc["setting"], doc["reference"]["setting"]
    keys = ("unet_network", "unet_channels", "unet_strides", "unet_num_res_units")
    assert {k: ours[k] for k in keys} == {k: ref[k] for k in keys} == {"unet_network": network, **sizes}
    # ours adds only the learned fill value of masked patches, one per channel
    assert ours["parameters"] - ref["parameters"] == 1
    assert "MONAI UNet" in format_speed(doc)


def test_cpu_clock_times_steps_in_cpu_seconds(tmp_path: Path) -> None:
    from ahm.bench.speed import format_speed, run_speed

    doc = run_speed(_cfg(tmp_path), ["random"], steps=1, warmup=1, rounds=3, clock="cpu")
    assert doc["setting"]["clock"] == "cpu"
    _check_rows(doc, {"random"})
    assert "cpu clock" in format_speed(doc)
    with pytest.raises(AhmError, match="--clock"):
        run_speed(_cfg(tmp_path), ["random"], clock="sundial")


def test_unknown_policy_is_refused(tmp_path: Path) -> None:
    from ahm.bench.speed import run_speed

    with pytest.raises(AhmError, match="--policies"):
        run_speed(_cfg(tmp_path), ["nope"])


def test_cli_json_and_decoder_options() -> None:
    from ahm.cli.app import _register, app

    _register()
    result = CliRunner().invoke(app, [
        "bench", "speed", "--policies", "random", "--image-size", "32", "--patch-size", "8", "--batch-size", "2",
        "--steps", "1", "--rounds", "1", "--warmup", "1", "--decoder-dim", "24", "--decoder-depth", "1",
        "--decoder-heads", "3", "--decoder-mlp-dim", "20", "--profile", "5", "--json",
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    for setting in (doc["setting"], doc["reference"]["setting"]):
        assert (setting["decoder_dim"], setting["decoder_depth"], setting["decoder_heads"],
                setting["decoder_mlp_dim"]) == (24, 1, 3, 20)
    assert set(doc["profiles"]) == {"random", doc["reference"]["name"]}
    assert "Self CPU" in doc["profiles"]["random"]


def _cfg_3d(tmp: Path, backbone: str) -> PretrainConfig:
    over = tiny_pretrain_overrides(tmp, backbone=backbone)
    over["data"].update(spatial_dims=3, crop_size=[16, 16, 16])
    over["model"].update(hidden_size=48, decoder_dim=24)  # MONAI's 3D MAE: widths divisible by 6
    return build_config(PretrainConfig, overrides=over)


# ahm-official needs a step for each of its three stages: 4 steps in all (odd rounds: _check_rows takes the middle one)
@pytest.mark.parametrize("backbone,policies,rounds", [("vit", ["random", "ahm", "block", "hpm", "adamae"], 1),
                                                      ("unet", ["random", "ahm-official"], 3)])
def test_3d_throughput_in_volumes_per_second(tmp_path: Path, backbone: str, policies: list[str], rounds: int) -> None:
    from ahm.bench.speed import format_speed, run_speed

    doc = run_speed(_cfg_3d(tmp_path, backbone), policies, steps=1, warmup=1, rounds=rounds)
    _check_rows(doc, set(policies))
    s = doc["setting"]
    assert (s["spatial_dims"], s["crop_size"], s["input_shape"], s["unit"]) == (3, [16] * 3, [16] * 3, "volumes/s")
    assert "statm" in s["memory"]
    for row in [*doc["policies"].values(), doc["reference"]]:
        assert 0 <= row["peak_growth_mib"] <= row["peak_mem_mib"]
    ours, ref = s, doc["reference"]["setting"]
    if backbone == "vit":
        # MONAI's 3D MAE at our sizes; parameters differ as in 2D, with (16/8)^3 = 8 patches
        assert {k: ours[k] for k in SIZE_KEYS} == {k: ref[k] for k in SIZE_KEYS}
        expected = 8 * ours["hidden_size"] + 3 * ours["decoder_depth"] * ours["decoder_dim"] - ours["hidden_size"]
        assert ours["parameters"] - ref["parameters"] == expected
    else:
        assert ours["parameters"] - ref["parameters"] == 1  # the learned fill value: the same 3D UNet otherwise
    text = format_speed(doc)
    assert "3D crop 16x16x16" in text and "volumes/s" in text and text.count("parameters") == 2


def test_3d_crop_must_hold_whole_patches(tmp_path: Path) -> None:
    from ahm.bench.speed import run_speed

    cfg = _cfg_3d(tmp_path, "vit")
    cfg.data.crop_size = (16, 16, 12)
    with pytest.raises(AhmError, match="crop_size 16x16x12"):
        run_speed(cfg, ["random"], steps=1, warmup=1, rounds=1)
    cfg = _cfg_3d(tmp_path, "vit")
    cfg.model.decoder_dim = 32
    with pytest.raises(AhmError, match=r"--decoder-dim: width 32; .*divisible by 6 \(e.g. 30\)"):
        run_speed(cfg, ["random"], steps=1, warmup=1, rounds=1)


def test_cli_3d_json_records_dims_crop_and_memory() -> None:
    from ahm.cli.app import _register, app

    _register()
    result = CliRunner().invoke(app, [
        "bench", "speed", "--spatial-dims", "3", "--crop-size", "16", "--patch-size", "8", "--policies", "random",
        "--backbone", "unet", "--batch-size", "1", "--steps", "1", "--rounds", "1", "--warmup", "1", "--json",
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc["setting"]["spatial_dims"], doc["setting"]["crop_size"]) == (3, [16, 16, 16])
    assert doc["policies"]["random"]["peak_growth_mib"] >= 0 and doc["setting"]["memory"]


def test_cli_config_sets_the_model_and_batch_and_options_win(tmp_path: Path) -> None:
    """--config times a grid's own setting: its `pretrain:` section sets backbone, UNet size, image, batch,
    mask ratio and threads; an option given on the command line wins over the file."""
    from ahm.cli.app import _register, app

    _register()
    config = tmp_path / "grid.yaml"
    config.write_text(
        "pretrain:\n"
        "  data: {image_size: 32}\n"
        "  model: {backbone: unet, unet_channels: [4, 8, 16], unet_strides: [2, 2], unet_num_res_units: 1}\n"
        "  masking: {mask_ratio: 0.5}\n"
        "  train: {batch_size: 3, num_threads: 1}\n"
        "finetune:\n"
        "  train: {batch_size: 7}\n")
    args = ["bench", "speed", "--config", str(config), "--policies", "random", "--steps", "1", "--rounds", "1",
            "--warmup", "1", "--json"]
    doc = json.loads(CliRunner().invoke(app, args).output)
    s = doc["setting"]
    assert (s["backbone"], s["image_size"], s["batch_size"], s["mask_ratio"], s["threads"]) == ("unet", 32, 3, 0.5, 1)
    for setting in (s, doc["reference"]["setting"]):  # ours and MONAI's UNet at the file's size
        assert (setting["unet_channels"], setting["unet_strides"], setting["unet_num_res_units"]) == ([4, 8, 16],
                                                                                                   [2, 2], 1)
    result = CliRunner().invoke(app, args + ["--batch-size", "2", "--mask-ratio", "0.25"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)["setting"]
    assert (s["batch_size"], s["mask_ratio"], s["unet_channels"]) == (2, 0.25, [4, 8, 16])
    missing = CliRunner().invoke(app, ["bench", "speed", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code != 0 and "nope.yaml" in missing.output and "Traceback" not in missing.output


@pytest.mark.parametrize("backbone", ["unet", "vit"])
def test_precision_and_compile_reach_ours_and_the_reference(tmp_path: Path, monkeypatch, backbone: str) -> None:
    import torch

    from ahm.bench.speed import format_speed, run_speed

    calls: list[tuple[str, bool, torch.dtype]] = []

    def compile_stand_in(module):  # records what torch.compile was given and how the result is called
        def forward(*args, **kwargs):
            calls.append((type(module).__name__, torch.is_autocast_enabled("cpu"), args[0].dtype))
            return module(*args, **kwargs)

        return forward

    import ahm.masking

    contexts = []
    build_policy = ahm.masking.build_policy

    def build_recording(masking, ctx):
        contexts.append(ctx)
        return build_policy(masking, ctx)

    monkeypatch.setattr(torch, "compile", compile_stand_in)
    monkeypatch.setattr(ahm.masking, "build_policy", build_recording)
    cfg = _cfg(tmp_path, backbone=backbone)
    cfg.train.precision, cfg.train.compile = "bf16-mixed", True
    doc = run_speed(cfg, ["random"], steps=1, warmup=1, rounds=1)
    reference = "UNet" if backbone == "unet" else "MaskedAutoEncoderViT"
    assert {name for name, _, _ in calls} == {"MaskedUNet" if backbone == "unet" else "MAEViT", reference}
    # as Fabric runs a training model: inputs cast to bfloat16, the forward pass under autocast
    assert all(autocast and dtype == torch.bfloat16 for _, autocast, dtype in calls)
    with contexts[0].autocast():  # what the policy's own networks run under
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert (doc["setting"]["precision"], doc["setting"]["compile"]) == ("bf16-mixed", True)
    assert ", bf16-mixed, compile on, " in format_speed(doc).splitlines()[0]


def test_header_names_the_default_precision_and_refuses_16_mixed(tmp_path: Path) -> None:
    from ahm.bench.speed import format_speed, run_speed
    from ahm.cli.app import _register, app

    cfg = _cfg(tmp_path, backbone="unet")
    doc = run_speed(cfg, ["random"], steps=1, warmup=1, rounds=1)
    assert ", 32-true, compile off, " in format_speed(doc).splitlines()[0]
    cfg.train.precision = "16-mixed"
    with pytest.raises(AhmError, match="^--precision 16-mixed: `ahm bench speed` times 32-true or bf16-mixed$"):
        run_speed(cfg, ["random"])
    _register()
    res = CliRunner().invoke(app, ["bench", "speed", "--precision", "fp8"])
    assert res.exit_code != 0 and res.output.strip() == ("error: --precision fp8: `ahm bench speed` times 32-true "
                                                         "or bf16-mixed")
