"""From an nnU-Net raw dataset to nnU-Net's own fine-tuning of an ahm-pretrained network, on the CPU.

nnU-Net reads its folders from environment variables when first imported, so its planning and training run in
child processes with nnUNet_raw / nnUNet_preprocessed / nnUNet_results set to temporary folders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.nnunet.make_raw import make_raw_2d

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                       reason="nnU-Net v2 is not installed (pip install 'ahm[nnunet]')"),
]

DATASET = 501

# nnU-Net finds trainers by name inside its own package; this one is constructed directly instead.
TRAIN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class TinyTrainer(nnUNetTrainer):
        # nnU-Net records its constructor's arguments by name, so the signature is spelled out
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1

    preprocessed, weights, report = sys.argv[1:4]
    plans = load_json(os.path.join(preprocessed, "nnUNetPlans.json"))
    plans["continue_training"] = False  # as nnU-Net's get_trainer_from_args sets it
    trainer = TinyTrainer(plans=plans, configuration="2d",
                          fold=0, dataset_json=load_json(os.path.join(preprocessed, "dataset.json")),
                          device=torch.device("cpu"))
    trainer.initialize()
    fresh = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}
    maybe_load_checkpoint(trainer, False, False, weights)  # what nnUNetv2_train -pretrained_weights does
    exported = torch.load(weights, weights_only=False)["network_weights"]
    start = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}
    body = [k for k in start if ".seg_layers." not in k]
    loaded = [k for k in body if torch.equal(start[k], exported[k])]
    replaced = [k for k in body if not torch.equal(start[k], fresh[k])]
    trainer.run_training()
    final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    after = torch.load(final, weights_only=False)["network_weights"]
    moved = [k for k in body if not torch.equal(after[k].float(), start[k].float())]
    json.dump({"body": len(body), "loaded": len(loaded), "replaced": len(replaced), "moved": len(moved), "final": final,
               "epoch": trainer.current_epoch}, open(report, "w"))
""")


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
                "nnUNet_results": str(tmp_path / "results"), "nnUNet_compile": "f",
                "OMP_NUM_THREADS": "2"})
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_pretrain_export_and_finetune_in_nnunet(tmp_path: Path) -> None:
    from ahm.cli.app import _register, app
    from ahm.export import export_run

    env = _env(tmp_path)
    raw = make_raw_2d(tmp_path / "raw", DATASET)
    _run([sys.executable, "-c", "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
          "plan_and_preprocess_entry as main; main()", "-d", str(DATASET), "-c", "2d", "-np", "1", "-npfp", "1",
          "--verify_dataset_integrity"], env, tmp_path)
    preprocessed = tmp_path / "preprocessed" / raw.name
    plans = preprocessed / "nnUNetPlans.json"
    assert plans.is_file()

    _register()
    runs = {}
    for policy in ("random", "ahm"):
        runs[policy] = tmp_path / f"run_{policy}"
        result = CliRunner().invoke(app, [
            "-q", "pretrain", str(raw), "--out", str(runs[policy]), "--policy", policy, "--backbone", "nnunet",
            "--plans", str(plans), "--configuration", "2d", "--steps", "2", "--batch-size", "4",
            "--accelerator", "cpu", "--workers", "0", "--agent-workers", "0"])
        assert result.exit_code == 0, result.output
        config = (runs[policy] / "config.yaml").read_text()
        assert "image_size: 64" in config  # the plans' 2D patch size

    weights = tmp_path / "ahm_random.pth"
    export_run(runs["random"], "nnunet", weights, plans=plans, configuration="2d")
    assert "configuration: 2d" in (tmp_path / "ahm_random.pth.txt").read_text()

    report = tmp_path / "report.json"
    script = tmp_path / "train_tiny.py"
    script.write_text(TRAIN_SCRIPT)
    # no augmentation worker processes: the training batches are made in the trainer's process
    _run([sys.executable, str(script), str(preprocessed), str(weights), str(report)],
         {**env, "nnUNet_n_proc_DA": "0"}, tmp_path)
    facts = json.loads(report.read_text())
    assert facts["body"] > 100
    assert facts["loaded"] == facts["body"]  # nnU-Net's network starts from every exported tensor
    assert facts["replaced"] > facts["body"] // 2  # which are not its own initialisation
    assert Path(facts["final"]).is_file() and facts["epoch"] == 1  # it finished its epoch
    assert facts["moved"] > 0  # and trained

