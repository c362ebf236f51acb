"""`ahm bench data`: generated corpora, the process-tree memory watch, and a real run of the whole bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from ahm.bench.data import _tree_rss_mib, format_data_bench, make_volume_corpus, run_data_bench


def test_corpus_is_made_once_and_kept(tmp_path: Path) -> None:
    root = make_volume_corpus(tmp_path / "c", volumes=2, slices=5, size=24)
    files = sorted((root / "images").glob("*.nii.gz"))
    assert [f.name for f in files] == ["vol00000.nii.gz", "vol00001.nii.gz"]
    assert nib.load(files[0]).shape == (24, 24, 5)
    before = files[0].stat().st_mtime_ns
    make_volume_corpus(tmp_path / "c", volumes=3, slices=5, size=24)
    assert files[0].stat().st_mtime_ns == before and len(list((root / "images").glob("*.nii.gz"))) == 3


def test_tree_memory_counts_the_children(tmp_path: Path) -> None:
    # a parent holding little and a child holding ~200 MiB: the tree's RSS includes the child
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
            "'b = bytearray(200 * 1024 * 1024); import time; time.sleep(30)']); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        import time

        deadline, seen = time.monotonic() + 20, 0.0
        while time.monotonic() < deadline and seen < 200:
            seen = max(seen, _tree_rss_mib(parent.pid))
            time.sleep(0.2)
        assert seen >= 200
        own = _tree_rss_mib(os.getpid())
        assert own > 0
    finally:
        for line in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split():
            os.kill(int(line), 9)
        parent.kill()


@pytest.mark.slow
def test_the_bench_runs_real_pretraining_on_both_corpora(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {backbone: unet, unet_channels: [8, 16], unet_strides: [2], patch_size: 8}\n"
                      "train: {batch_size: 4, log_every: 1, warmup_steps: 1, accelerator: cpu}\n")
    doc = run_data_bench(tmp_path / "bench", large=3, small=1, slices=8, size=32, steps=12, workers=1,
                         config=config, extra=["--image-size", "32"])
    runs = doc["runs"]
    assert runs["large"]["corpus_images"] == 24 and runs["small"]["corpus_images"] == 8
    assert runs["large"]["preloaded"] is False and runs["small"]["preloaded"] is False
    assert runs["small_in_memory"]["preloaded"] is True
    assert all(r["peak_rss_mib"] > 50 and r["first_step_s"] > 0 and r["images_per_s"] > 0 for r in runs.values())
    assert doc["memory_ratio_large_over_small"] > 0 and doc["streamed_over_in_memory"] > 0
    assert doc["cache"]["first_epoch_samples_per_s"] > 0 and doc["cache"]["speed_up"] > 0
    assert "peak memory large / small" in format_data_bench(doc)
    json.dumps(doc)
