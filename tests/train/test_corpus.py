"""The streamed pretraining corpus: several sources and manifests, a seeded order that does not depend on the
number of DataLoader workers, exact resume mid-epoch, disjoint DDP shards, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from train_helpers import make_blob_folder, tiny_pretrain_overrides
from typer.testing import CliRunner

from ahm.config import PretrainConfig, SourceConfig, build_config
from ahm.data.corpus import CorpusDataset, StepBatches, make_loader, open_corpus
from ahm.data.corpus_index import read_manifest, resolve_sources
from ahm.errors import AhmError
from ahm.io import load_torch
from ahm.train.pretrain import pretrain


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return make_blob_folder(tmp_path_factory.mktemp("blobs") / "data", n=12)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """An unlabelled folder of 5 NIfTI volumes of 6 slices each (30 slices)."""
    root = tmp_path_factory.mktemp("vols") / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for v in range(5):
        img = rng.normal(100, 20, size=(24, 20, 6)).astype(np.float32)
        img[6:14, 5:12] += 200 + 10 * v
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "images" / f"vol{v}.nii.gz")
    return root


def _cfg(data: Path, **over) -> PretrainConfig:
    o = tiny_pretrain_overrides(data, steps=over.pop("steps", 4))
    for key, value in over.items():
        if isinstance(value, dict):
            o[key] = {**o.get(key, {}), **value}
        else:
            o[key] = value
    return build_config(PretrainConfig, overrides=o)


def _sources(*specs: dict) -> list[dict]:
    return [SourceConfig(**s).model_dump() for s in specs]


def _batches(corpus, seed=0, batch=4, start=0, stop=6, rank=0, world=1, workers=0, augment=None):
    dataset = CorpusDataset(corpus, augment, seed)
    loader = make_loader(dataset, StepBatches(corpus, seed, batch, start, stop, rank, world), workers)
    return [(b["entry"], b["image"]) for b in loader]


def test_sources_listed_from_headers_train_split_of_labelled_all_of_unlabelled(blobs, volumes):
    cfg = _cfg(blobs, sources=_sources({"path": str(blobs)}, {"path": str(volumes)}))
    corpus = open_corpus(cfg)
    labelled, unlabelled = corpus.sources
    assert not unlabelled.index.has_labels and len(unlabelled.ids) == 30  # every slice of every volume
    from ahm.data import make_splits

    train = make_splits(labelled.index, labelled.data_cfg)["train"]
    assert labelled.ids == list(train) and 0 < len(train) < 12
    assert corpus.n_entries == corpus.epoch_size == len(train) + 30
    everything = open_corpus(_cfg(blobs, all_splits=True))
    assert len(everything.sources[0].ids) == 12


def test_epoch_order_is_seeded_and_follows_the_weights(blobs, volumes):
    cfg = _cfg(blobs, sources=_sources({"path": str(blobs), "weight": 2.0}, {"path": str(volumes), "weight": 0.5}))
    corpus = open_corpus(cfg)
    a, b = corpus.sources
    order0 = corpus.epoch_order(0, seed=3)
    assert order0 == corpus.epoch_order(0, seed=3) and order0 != corpus.epoch_order(1, seed=3)
    assert len(order0) == corpus.epoch_size == 2 * len(a.ids) + 15
    counts = np.bincount(order0, minlength=corpus.n_entries)
    assert (counts[a.start:a.stop] == 2).all()  # weight 2: every image twice
    assert sorted(set(counts[b.start:b.stop].tolist())) == [0, 1] and counts[b.start:b.stop].sum() == 15
    later = np.bincount(corpus.epoch_order(1, seed=3), minlength=corpus.n_entries)[b.start:b.stop]
    assert (later != counts[b.start:b.stop]).any()  # a different half of the fractional source each epoch


def test_steps_are_the_same_in_any_number_of_workers_and_from_any_start(volumes):
    from ahm.data import pretrain_augment

    corpus = open_corpus(_cfg(volumes))
    aug = pretrain_augment(32)
    main = _batches(corpus, seed=1, stop=12, workers=0, augment=aug)  # 12 steps of 4: over an epoch of 30
    two = _batches(corpus, seed=1, stop=12, workers=2, augment=pretrain_augment(32))
    for (ea, ia), (eb, ib) in zip(main, two, strict=True):
        assert ea == eb and torch.equal(ia, ib)
    resumed = _batches(corpus, seed=1, start=5, stop=12, workers=2, augment=pretrain_augment(32))
    for (ea, ia), (eb, ib) in zip(main[5:], resumed, strict=True):
        assert ea == eb and torch.equal(ia, ib)
    # an epoch visits every slice once; the last partial batch is dropped
    epoch = [k for entries, _ in main[:7] for k in entries]
    assert len(set(epoch)) == len(epoch) == 28


def test_ranks_take_disjoint_shares_of_each_global_batch(volumes):
    corpus = open_corpus(_cfg(volumes))
    whole = _batches(corpus, batch=4, stop=3, world=1)
    ranks = [_batches(corpus, batch=2, stop=3, rank=r, world=2) for r in (0, 1)]
    for step in range(3):
        a, b = ranks[0][step][0], ranks[1][step][0]
        assert not set(a) & set(b) and a + b == whole[step][0]


def test_streamed_samples_equal_the_in_memory_ones(volumes):
    from ahm.data import load_arrays

    cfg = _cfg(volumes)
    corpus = open_corpus(cfg)
    source = corpus.sources[0]
    arrays = load_arrays(source.index, source.ids, source.data_cfg, labels=False)
    dataset = CorpusDataset(corpus, None, 0)
    for k in (0, 7, 29):
        assert np.array_equal(dataset.image(k).numpy(), arrays.images[k])


def test_manifest_resolves_relative_paths_and_refuses_escapes(tmp_path, blobs, volumes):
    import shutil

    root = tmp_path / "corpus"
    shutil.copytree(blobs, root / "a")
    shutil.copytree(volumes, root / "b")
    manifest = root / "corpus.json"
    manifest.write_text(json.dumps({"sources": [{"path": "a", "weight": 2}, {"path": "b", "modality": "mri"}]}))
    specs = read_manifest(manifest)
    assert [Path(s.path) for s in specs] == [(root / "a").resolve(), (root / "b").resolve()]
    assert specs[0].weight == 2 and specs[1].modality == "mri"
    assert [s.path for s in resolve_sources([manifest])] == [s.path for s in specs]
    (root / "bad.json").write_text(json.dumps([{"path": "../elsewhere"}]))
    with pytest.raises(AhmError, match="leaves the manifest's folder"):
        read_manifest(root / "bad.json")
    (root / "weight.json").write_text(json.dumps([{"path": "a", "weight": -1}]))
    with pytest.raises(AhmError, match="source 1: weight"):
        read_manifest(root / "weight.json")
    (root / "empty.json").write_text(json.dumps({"sources": []}))
    with pytest.raises(AhmError, match="lists its sources"):
        read_manifest(root / "empty.json")
    with pytest.raises(AhmError, match="not found"):
        resolve_sources([root / "missing"])


def test_mixed_channel_counts_are_refused_unless_converted(tmp_path, blobs):
    from PIL import Image

    colour = tmp_path / "colour"
    (colour / "images").mkdir(parents=True)
    for png in sorted((blobs / "images").glob("*.png"))[:6]:
        Image.open(png).convert("RGB").save(colour / "images" / png.name)
    cfg = _cfg(blobs, sources=_sources({"path": str(blobs)}, {"path": str(colour)}))
    with pytest.raises(AhmError, match="mixes channel counts"):
        open_corpus(cfg)
    cfg.data.channels = 1
    assert open_corpus(cfg).channels == 1


def test_pretrain_on_two_sources_from_the_cli(tmp_path, blobs, volumes):
    from ahm.cli.app import _register, app

    _register()
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["--quiet", "pretrain", str(blobs), str(volumes), "--out", str(out), "--steps", "3",
                                   "--image-size", "32", "--batch-size", "4", "--workers", "1",
                                   "--model", "tiny", "--backbone", "unet"])
    assert res.exit_code == 0, res.output
    corpus = json.loads((out / "corpus.json").read_text())
    assert [s["images"] for s in corpus["sources"]][1] == 30 and corpus["sources"][1]["volumes"] == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corpus_images"] == corpus["entries"] and summary["loader_workers"] == 1
    res = CliRunner().invoke(app, ["pretrain", str(blobs), str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")])
    assert res.exit_code != 0 and "nowhere" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r2").exists()


def test_resume_mid_epoch_with_workers_equals_an_uninterrupted_run_without(tmp_path, volumes):
    full = _cfg(volumes, steps=10, train={"workers": 0, "batch_size": 4}, preload="yes")
    pretrain(full, tmp_path / "full", progress=False)
    part = _cfg(volumes, steps=10, train={"workers": 2, "batch_size": 4}, preload="no")  # streamed
    pretrain(part, tmp_path / "part", progress=False, stop_at=4)  # 7 steps an epoch: stops mid-epoch
    pretrain(part, tmp_path / "part", resume=True, progress=False)
    a = load_torch(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = load_torch(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert a["step"] == b["step"] == 10
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_unreadable_file_found_while_streaming(tmp_path, blobs):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(blobs, data)
    victim = sorted((data / "images").glob("*.png"))[-1]  # not the first: that one is read before training
    corpus = open_corpus(_cfg(data, all_splits=True))
    assert corpus.n_entries == 12
    victim.write_bytes(victim.read_bytes()[:40])  # truncated after listing: found only when read
    cfg = _cfg(data, all_splits=True, train={"workers": 1, "batch_size": 4}, steps=3, preload="no")
    with pytest.raises(AhmError, match=victim.name) as err:
        pretrain(cfg, tmp_path / "run", progress=False)
    assert "\n" not in str(err.value) and "Last checkpoint" in str(err.value)
    cfg.data.skip_bad = True
    summary = pretrain(cfg, tmp_path / "run2", progress=False)
    assert summary["skipped_files"]["count"] >= 1 and victim.name in summary["skipped_files"]["first"][0]
    # preloaded: the same file stops the run before training, or is skipped and counted
    cfg.preload, cfg.data.skip_bad = "yes", False
    with pytest.raises(AhmError, match=victim.name):
        pretrain(cfg, tmp_path / "run3", progress=False)
    cfg.data.skip_bad = True
    summary = pretrain(cfg, tmp_path / "run4", progress=False)
    assert summary["preloaded"] and victim.name in summary["skipped_files"]["first"][0]


def test_torchrun_on_several_nodes_gives_fabric_the_nodes_and_processes_per_node(monkeypatch):
    """`torchrun --nnodes 2 --nproc-per-node 4`: rank 5 is local rank 1 of node 1, in a world of 8."""
    from ahm.config import TrainConfig
    from ahm.train.loop import make_fabric

    env = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "1", "RANK": "5", "GROUP_RANK": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555", "TORCHELASTIC_RUN_ID": "test"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fabric = make_fabric(TrainConfig(accelerator="cpu", devices=1))
    assert (fabric.world_size, fabric.global_rank, fabric.node_rank, fabric.local_rank) == (8, 5, 1, 1)


def test_a_manifest_written_by_data_index_is_a_corpus(tmp_path, blobs, volumes):
    import shutil

    from ahm.cli.app import _register, app

    root = tmp_path / "archive"
    shutil.copytree(blobs, root / "a")
    shutil.copytree(volumes, root / "b")
    _register()
    res = CliRunner().invoke(app, ["data", "index", str(root / "a"), str(root / "b"), "--out", str(root / "corpus.json")])
    assert res.exit_code == 0, res.output
    specs = resolve_sources([root / "corpus.json"])
    assert [Path(s.path) for s in specs] == [(root / "a").resolve(), (root / "b").resolve()]
    corpus = open_corpus(_cfg(root / "a", sources=[s.model_dump() for s in specs]))
    assert corpus.n_entries == len(corpus.sources[0].ids) + 30


def test_skip_bad_passes_over_a_whole_unreadable_volume_and_counts_it_once(tmp_path, volumes):
    import shutil

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for v in range(3):  # volumes of 12 slices: more than the stand-ins a slice may try
        nib.save(nib.Nifti1Image(rng.normal(100, 20, (24, 20, 12)).astype(np.float32), np.eye(4)),
                 data / "images" / f"vol{v}.nii.gz")
    victim = data / "images" / "vol1.nii.gz"
    open_corpus(_cfg(data))  # listed while whole
    victim.write_bytes(victim.read_bytes()[:400])
    for preload in ("no", "yes"):
        cfg = _cfg(data, steps=12, preload=preload, train={"workers": 1, "batch_size": 4})
        cfg.data.skip_bad = True
        summary = pretrain(cfg, tmp_path / f"run-{preload}", progress=False)
        assert summary["steps"] == 12 and (tmp_path / f"run-{preload}" / "reconstructions.png").is_file()
        assert summary["skipped_files"]["count"] == 1 and "vol1" in summary["skipped_files"]["first"][0]
    shutil.rmtree(data)


def test_a_2d_source_of_weight_2_spreads_its_copies_over_the_epoch(tmp_path):
    from PIL import Image

    data = tmp_path / "pngs"
    (data / "images").mkdir(parents=True)
    for k in range(200):
        Image.fromarray(np.full((32, 32), k, np.uint8)).save(data / "images" / f"p{k:03d}.png")
    corpus = open_corpus(_cfg(data, sources=_sources({"path": str(data), "weight": 2.0})))
    order = corpus.epoch_order(0, seed=0)
    assert len(order) == 400 and sorted(np.bincount(order).tolist()) == [2] * 200
    batches = [order[i:i + 16] for i in range(0, 400, 16)]
    repeated = sum(len(set(b)) < len(b) for b in batches)
    assert repeated < len(batches) / 2  # copies are not kept side by side


def test_the_on_disk_cache_gives_the_same_samples_and_is_reused(tmp_path, volumes):
    from ahm.data.corpus import SampleCache

    corpus = open_corpus(_cfg(volumes))
    plain = CorpusDataset(corpus, None, 0)
    cache = SampleCache(tmp_path / "cache", corpus)
    cached = CorpusDataset(corpus, None, 0, cache=cache)
    assert cache.filled() == 0
    for k in (0, 7, 29):
        assert torch.equal(cached.image(k), plain.image(k))
    assert cache.filled() == 3
    for k in (0, 7, 29):  # now read from the store (the same key: the same corpus and settings)
        again = SampleCache(tmp_path / "cache", corpus)
        assert again.key == cache.key and torch.equal(torch.from_numpy(again.get(k)), plain.image(k))
    # a run streams through the store: the same weights as a run without it, and the store is full afterwards
    train = {"workers": 2, "batch_size": 4}
    a = pretrain(_cfg(volumes, steps=8, preload="no", train=train), tmp_path / "a", progress=False)
    b = pretrain(_cfg(volumes, steps=8, preload="no", train=train, cache=str(tmp_path / "c2")),
                 tmp_path / "b", progress=False)
    # 7 steps of 4 are an epoch of 28 of the 30 slices (the rest is the dropped partial batch)
    assert 28 <= b["cache"]["filled"] <= 30 and b["cache"]["entries"] == 30 and a.get("cache") is None
    wa, wb = (load_torch(tmp_path / r / "checkpoints" / "last.ckpt")["model"] for r in ("a", "b"))
    assert all(torch.equal(wa[key], wb[key]) for key in wa)
    # another corpus setting, another store
    other_cfg = _cfg(volumes)
    other_cfg.data.image_size = 16
    other = open_corpus(other_cfg)
    assert SampleCache(tmp_path / "cache", other).key != cache.key
