"""The steps both nnU-Net end-to-end tests take: nnU-Net's planning and preprocessing, and nnU-Net's own trainer
fine-tuning from an exported checkpoint.

nnU-Net reads its folders from environment variables when first imported, so its planning and training run in
child processes with nnUNet_raw / nnUNet_preprocessed / nnUNet_results set to temporary folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

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

    preprocessed, configuration, weights, report = sys.argv[1:5]
    plans = load_json(os.path.join(preprocessed, "nnUNetPlans.json"))
    plans["continue_training"] = False  # as nnU-Net's get_trainer_from_args sets it
    trainer = TinyTrainer(plans=plans, configuration=configuration,
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


def nnunet_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
                "nnUNet_results": str(tmp_path / "results"), "nnUNet_compile": "f",
                "OMP_NUM_THREADS": "2"})
    return env


def run_checked(args: list[str], env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def plan_and_preprocess(tmp_path: Path, raw: Path, dataset: int, configuration: str) -> Path:
    """nnU-Net's planning and preprocessing of `raw` for one configuration; returns the plans file."""
    run_checked([sys.executable, "-c", "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
                 "plan_and_preprocess_entry as main; main()", "-d", str(dataset), "-c", configuration, "-np", "1",
                 "-npfp", "1", "--verify_dataset_integrity"], nnunet_env(tmp_path), tmp_path)
    plans = tmp_path / "preprocessed" / raw.name / "nnUNetPlans.json"
    assert plans.is_file()
    return plans


def finetune_in_nnunet(tmp_path: Path, plans: Path, configuration: str, weights: Path) -> dict[str, Any]:
    """nnU-Net's trainer for `configuration`, started from `weights` as -pretrained_weights does, for one tiny epoch:
    counts of the network's non-segmentation tensors loaded, replaced and moved by training."""
    report = tmp_path / f"report_{configuration}.json"
    script = tmp_path / "train_tiny.py"
    script.write_text(TRAIN_SCRIPT)
    # no augmentation worker processes: the training batches are made in the trainer's process
    run_checked([sys.executable, str(script), str(plans.parent), configuration, str(weights), str(report)],
                {**nnunet_env(tmp_path), "nnUNet_n_proc_DA": "0"}, tmp_path)
    return json.loads(report.read_text())


def assert_loaded_and_trained(facts: dict[str, Any]) -> None:
    assert facts["body"] > 100
    assert facts["loaded"] == facts["body"]  # nnU-Net's network starts from every exported tensor
    assert facts["replaced"] > facts["body"] // 2  # which are not its own initialisation
    assert Path(facts["final"]).is_file() and facts["epoch"] == 1  # it finished its epoch
    assert facts["moved"] > 0  # and trained
