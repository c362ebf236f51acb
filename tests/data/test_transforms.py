"""Augmentations: shapes and types kept, reproducible from a seed, labels never blended."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ahm.data.transforms import pretrain_augment, segment_augment
from ahm.errors import AhmError

SIZE = 24


def _sample(with_label: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    sample = {"image": torch.rand(3, SIZE, SIZE, generator=g)}
    if with_label:
        label = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
        label[0, 2:12, 3:15] = 1
        label[0, 14:22, 10:20] = 4
        sample["label"] = label
    return sample


def _every_aug(size: int = SIZE):
    """segment_augment with every random part switched on (the defaults leave only the crop and flips)."""
    return segment_augment(size, min_crop_area=0.7, rotate_deg=10.0, intensity_jitter=0.05, gamma=0.5,
                           bias_field=0.2, crop_size=size - 4)


def _run(aug, sample, seed):
    aug.set_random_state(seed=seed)
    return aug({k: v.clone() for k, v in sample.items()})


def test_pretrain_shapes_types_and_determinism():
    aug = pretrain_augment(SIZE)
    sample = _sample(with_label=False)
    a, b = _run(aug, sample, 7), _run(aug, sample, 7)
    assert type(a["image"]) is torch.Tensor and a["image"].dtype == torch.float32
    assert a["image"].shape == (3, SIZE, SIZE)
    assert torch.equal(a["image"], b["image"])
    others = [_run(aug, sample, s)["image"] for s in range(8, 12)]
    assert all(not torch.equal(a["image"], o) for o in others)
    assert not torch.equal(a["image"], sample["image"])


def test_segment_keeps_labels_and_moves_them_with_the_image():
    aug = segment_augment(SIZE, min_crop_area=0.7, intensity_jitter=0.05, crop_size=SIZE - 4)
    sample = _sample()
    # The image carries the label in its first channel: after augmentation the two must still coincide.
    sample["image"][0] = sample["label"][0].float()
    changed = 0
    for seed in range(12):
        out = _run(aug, sample, seed)
        assert out["label"].dtype == torch.long and out["label"].shape == (1, SIZE, SIZE)
        assert out["image"].shape == (3, SIZE, SIZE)
        assert set(out["label"].unique().tolist()) <= {0, 1, 4}
        image_fg = out["image"][0] > out["image"][0].median() + 0.5
        label_fg = out["label"][0] > 0
        # Bilinear blur at edges aside, the spatial transform was the same for both.
        assert (image_fg == label_fg).float().mean() > 0.9
        changed += int(not torch.equal(out["label"], sample["label"]))
        again = _run(aug, sample, seed)
        assert torch.equal(out["label"], again["label"]) and torch.equal(out["image"], again["image"])
    assert changed >= 6


def test_segment_works_without_label_and_differs_by_seed():
    aug = _every_aug()
    sample = _sample(with_label=False)
    outs = [_run(aug, sample, s)["image"] for s in range(4)]
    assert all(o.shape == (3, SIZE, SIZE) for o in outs)
    assert len({o.numpy().tobytes() for o in outs}) == 4


def test_same_seed_same_output_across_fresh_instances():
    sample = _sample()
    a = _run(_every_aug(), sample, 123)
    b = _run(_every_aug(), sample, 123)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    c = _run(_every_aug(), sample, 124)
    assert not (torch.equal(a["image"], c["image"]) and torch.equal(a["label"], c["label"]))


def test_global_random_state_not_used():
    sample = _sample()
    aug = _every_aug()
    torch.manual_seed(0)
    np.random.seed(0)
    a = _run(aug, sample, 5)
    torch.manual_seed(99)
    np.random.seed(99)
    b = _run(aug, sample, 5)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_bad_size_refused():
    with pytest.raises(AhmError, match="image_size"):
        pretrain_augment(1)


def test_segment_without_crop_only_flips_the_geometry():
    # min_crop_area 1: no rescaling, so every output label is one of the four flips of the input label.
    aug = segment_augment(SIZE, min_crop_area=1.0)
    sample = _sample()
    label = sample["label"]
    flips = [label, label.flip(1), label.flip(2), label.flip(1).flip(2)]
    seen = set()
    for seed in range(16):
        out = _run(aug, sample, seed)["label"]
        matches = [k for k, f in enumerate(flips) if torch.equal(out, f)]
        assert matches, seed
        seen.add(matches[0])
    assert len(seen) >= 3
    with pytest.raises(AhmError, match="min_crop_area"):
        segment_augment(SIZE, min_crop_area=0.0)


def test_segment_rotation_moves_label_and_image_together():
    aug = segment_augment(SIZE, min_crop_area=1.0, rotate_deg=30.0)
    sample = _sample()
    sample["image"][0] = sample["label"][0].float()
    rotated = 0
    flips = [sample["label"], sample["label"].flip(1), sample["label"].flip(2), sample["label"].flip(1).flip(2)]
    for seed in range(12):
        out = _run(aug, sample, seed)
        assert out["label"].dtype == torch.long and set(out["label"].unique().tolist()) <= {0, 1, 4}
        image_fg = out["image"][0] > out["image"][0].median() + 0.5
        assert (image_fg == (out["label"][0] > 0)).float().mean() > 0.9
        rotated += int(not any(torch.equal(out["label"], f) for f in flips))
    assert rotated >= 3
    with pytest.raises(AhmError, match="rotate_deg"):
        segment_augment(SIZE, rotate_deg=-1.0)


def test_segment_intensity_jitter_is_off_by_default_and_bounded_when_on():
    sample = _sample()
    image = sample["image"]
    flips = [image, image.flip(1), image.flip(2), image.flip(1).flip(2)]
    plain = segment_augment(SIZE, min_crop_area=1.0)
    for seed in range(8):
        out = _run(plain, sample, seed)["image"]
        assert any(torch.equal(out, f) for f in flips), seed  # intensities untouched: only the geometry moved
    jittered = segment_augment(SIZE, min_crop_area=1.0, intensity_jitter=0.2)
    changed = 0
    for seed in range(8):
        out = _run(jittered, sample, seed)["image"]
        # each pixel is at most scaled by 1.2 and shifted by 0.2 relative to its flipped original
        close = [float((out - f).abs().max()) for f in flips]
        assert min(close) <= 0.2 * float(image.abs().max()) * 1.2 + 0.2 + 1e-5
        changed += int(not any(torch.equal(out, f) for f in flips))
    assert changed >= 3
    with pytest.raises(AhmError, match="intensity_jitter"):
        segment_augment(SIZE, intensity_jitter=1.5)


def _flipped_to_match(out: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The flip of `image` whose zero pattern matches `out` (the acquisition changes keep zeros at zero)."""
    flips = [image, image.flip(1), image.flip(2), image.flip(1).flip(2)]
    return next(f for f in flips if torch.equal(f == 0, out == 0))


def test_segment_gamma_keeps_intensity_order_and_labels():
    sample = _sample()
    image = sample["image"]
    image[:, :4] = 0.0  # background bands in one corner (so each flip has its own zero pattern): they stay zero
    image[:, :, :2] = 0.0
    plain = segment_augment(SIZE, min_crop_area=1.0)
    aug = segment_augment(SIZE, min_crop_area=1.0, gamma=0.5)
    changed = 0
    for seed in range(10):
        out = _run(aug, sample, seed)
        ref = _run(plain, sample, seed)  # the same flips: only the intensities differ
        assert torch.equal(out["label"], ref["label"])
        before = _flipped_to_match(out["image"], image)
        assert torch.equal(before, ref["image"])
        for c in range(image.shape[0]):  # a gamma on each image's own range is monotone: ranks kept
            x, y = before[c].flatten(), out["image"][c].flatten()
            order = torch.argsort(x)
            assert bool((y[order][1:] >= y[order][:-1] - 1e-6).all()), seed
            assert float(y.min()) == pytest.approx(float(x.min()), abs=1e-6)
            assert float(y.max()) == pytest.approx(float(x.max()), abs=1e-4)
        changed += int(not torch.allclose(out["image"], before))
    assert 2 <= changed <= 9  # half of the time, give or take


def test_segment_bias_field_is_smooth_positive_and_keeps_zeros():
    sample = _sample()
    image = sample["image"] + 0.1  # no zeros inside, so the field can be read off everywhere
    image[:, :, :3] = 0.0
    image[:, :2] = 0.0
    sample["image"] = image
    aug = segment_augment(SIZE, min_crop_area=1.0, bias_field=0.3)
    changed = 0
    for seed in range(10):
        out = _run(aug, sample, seed)
        before = _flipped_to_match(out["image"], image)
        inside = before > 0
        assert torch.equal(out["image"][~inside], before[~inside])
        field = out["image"][inside] / before[inside]
        assert float(field.min()) > 0
        if not torch.allclose(field, torch.ones_like(field)):
            changed += 1
            ratio = torch.where(inside, out["image"] / before.clamp_min(1e-12), torch.nan)[0]
            steps = (ratio[2:, 4:] - ratio[2:, 3:-1]).abs()  # neighbours inside: a smooth field moves little
            assert float(steps[~steps.isnan()].max()) < 0.25 * float(field.max())
            # the same multiplicative field on every channel of one image
            assert torch.allclose(out["image"][1] * before[0], out["image"][0] * before[1], atol=1e-5)
    assert 2 <= changed <= 9
    with pytest.raises(AhmError, match="gamma"):
        segment_augment(SIZE, gamma=-0.1)
    with pytest.raises(AhmError, match="bias_field"):
        segment_augment(SIZE, bias_field=2.0)


def test_segment_crop_keeps_pixels_exact_and_pads_back_when_asked():
    sample = _sample()
    sample["image"] = sample["image"][:1]
    image, label = sample["image"][0], sample["label"][0]
    for pad in (True, False):
        aug = segment_augment(SIZE, crop_size=16, pad=pad)
        for seed in range(6):
            out = _run(aug, sample, seed)
            assert out["image"].shape == ((1, SIZE, SIZE) if pad else (1, 16, 16))
            # undo the flips, find the 16x16 window of the input that the output holds: values equal exactly
            found = False
            for flip in ([], [1], [2], [1, 2]):
                img = out["image"].flip(flip) if flip else out["image"]
                lab = out["label"].flip(flip) if flip else out["label"]
                if pad:
                    nz = (img[0] != 0).nonzero()
                    top, left = int(nz[:, 0].min()), int(nz[:, 1].min())
                    img, lab = img[:, top:top + 16, left:left + 16], lab[:, top:top + 16, left:left + 16]
                for y in range(SIZE - 15):
                    for x in range(SIZE - 15):
                        if torch.equal(img[0], image[y:y + 16, x:x + 16]):
                            found = found or torch.equal(lab[0], label[y:y + 16, x:x + 16])
            assert found, (pad, seed)
    with pytest.raises(AhmError, match="crop size"):
        segment_augment(SIZE, crop_size=SIZE + 1)


def test_train_crop_size_fits_the_unet_strides():
    from ahm.config import FinetuneConfig
    from ahm.train.finetune import train_crop_size

    cfg = FinetuneConfig(segmenter="unet", data={"image_size": 128},
                         model={"backbone": "unet", "unet_channels": (4, 8, 16, 32), "unet_strides": (2, 2, 2)})
    assert train_crop_size(cfg) == 96
    assert train_crop_size(cfg.model_copy(update={"crop_fraction": 0.3})) == 32  # 38 rounded down to 8s
    assert train_crop_size(cfg.model_copy(update={"crop_fraction": 0.01})) == 8
    assert train_crop_size(cfg.model_copy(update={"crop_fraction": 1.0})) is None
    unetr = FinetuneConfig(segmenter="unetr", data={"image_size": 128}, crop_fraction=0.3)
    assert train_crop_size(unetr) == 38
