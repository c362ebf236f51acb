"""Whole-image and sliding-window inference for 2D images and 3D volumes: one function for fine-tuning validation,
`ahm evaluate` and `ahm predict`.

The window is the training crop (`roi_size`). How an input is covered depends on its size:

- larger than the window along any axis: MONAI `sliding_window_inference` (windows of exactly `roi_size`,
  `overlap` between neighbours, blended with Gaussian or constant weights; axes shorter than the window are
  zero-padded for it and cropped back);
- no larger than the window along every axis: the network runs once on the input zero-padded to the window
  (MONAI `SpatialPad` semantics: symmetric, constant 0) and the output is cropped back. Padding, not a smaller
  forward pass, because the network was trained on windows of this size and some cannot take another
  (a ViT's position table, UNETR's `img_size`); an input exactly the window's size is not padded at all, so
  a 2D image on the model grid goes through `model(x)` alone, bit for bit as before sliding windows;
- `roi_size=None`: the whole input in one pass, zero-padded up to a multiple of `divisible_by` if given
  (MONAI `DivisiblePad` semantics) and cropped back, for fully convolutional networks whose strides need it.

Blending happens on logits; `probabilities=True` applies the softmax over classes afterwards.

Precision: `32-true` runs the network in float32; `bf16-mixed` and `16-mixed` run each forward pass under
`torch.autocast` (bfloat16, float16; the weights stay float32) and turn its logits to float32 as they leave the
network, so MONAI's blend, the softmax and the argmax all happen in float32. MONAI's blend would not do that by
itself: its buffers take the input's dtype, but it weights each window in place (`window *= weights`), which keeps
the window's own bfloat16.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ahm.errors import AhmError

BLEND_MODES = ("gaussian", "constant")
# the names and the refusal of 16-mixed on the CPU are training's (`ahm.train.loop.make_fabric`); "32" is 32-true
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def check_precision(precision: str, device: torch.device | str) -> str:
    """The inference precision `precision` names on `device`, or a one-line refusal naming --precision."""
    name = "32-true" if precision == "32" else str(precision)
    if name not in PRECISIONS:
        raise AhmError(f"--precision {precision}: inference runs {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
    if name == "16-mixed" and torch.device(device).type == "cpu":
        raise AhmError("--precision 16-mixed needs a GPU; on the CPU use bf16-mixed or 32-true")
    return name


def _predictor(model: torch.nn.Module, precision: str, device: torch.device):
    """`model` as a function of one input batch, under autocast for a mixed precision, its logits in float32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return model

    def forward(x: torch.Tensor):
        with torch.autocast(device.type, dtype=dtype):
            y = model(x)
        return y.float() if isinstance(y, torch.Tensor) else y

    return forward


def _as_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    values = (int(value),) * n if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(values) != n:
        raise AhmError(f"{name}: {len(values)} values for {n} spatial axes")
    if any(v < 1 for v in values):
        raise AhmError(f"{name}: every size must be at least 1, got {values}")
    return values


def _pad(x: torch.Tensor, widths: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Zero-pad the spatial axes of [N, C, *spatial] by MONAI's (before, after) widths, listed per spatial axis."""
    if not any(b or a for b, a in widths):
        return x
    flat = [w for before, after in reversed(list(widths)) for w in (before, after)]  # F.pad: last axis first
    return torch.nn.functional.pad(x, flat, mode="constant", value=0.0)


def _crop(y: torch.Tensor, widths: Sequence[tuple[int, int]]) -> torch.Tensor:
    if not any(b or a for b, a in widths):
        return y
    index = [slice(None), slice(None)] + [slice(b, y.shape[2 + i] - a) for i, (b, a) in enumerate(widths)]
    return y[tuple(index)]


def _forward_padded(model, x: torch.Tensor, widths: Sequence[tuple[int, int]],
                    device: torch.device, out_device: torch.device) -> torch.Tensor:
    y = model(_pad(x.to(device), widths))
    return _crop(y, widths).to(out_device)


def sliding_window_predict(model: torch.nn.Module, images: np.ndarray | torch.Tensor,
                           roi_size: int | Sequence[int] | None = None, *, overlap: float = 0.5,
                           mode: str = "gaussian", sw_batch_size: int = 4,
                           divisible_by: int | Sequence[int] | None = None, probabilities: bool = False,
                           device: torch.device | str | None = None,
                           output_device: torch.device | str | None = None,
                           precision: str = "32-true") -> torch.Tensor:
    """Logits (or softmax probabilities) `[N, K, *spatial]` for `images` `[N, C, *spatial]` (2D or 3D), with the
    input's spatial shape, in eval mode without autograd; see the module doc for how the input is covered.

    roi_size: the window (the training crop), one int for every axis or one per axis; None: the whole input.
    overlap: share of a window shared with its neighbour, in [0, 1). mode: "gaussian" or "constant" blending.
    divisible_by: what every network input must be a multiple of (a UNet's total stride); the window must be.
    device: where the network runs (default: its parameters'); output_device: where the result is gathered
    (default: the input's device, CPU for numpy), so a large volume can be stitched in host memory.
    precision: 32-true, bf16-mixed or 16-mixed (a GPU's only), see the module doc; the result is float32 in each.
    """
    from monai.inferers import sliding_window_inference
    from monai.transforms import DivisiblePad, SpatialPad

    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images,
                        dtype=torch.float32)
    if x.ndim < 3:
        raise AhmError(f"inference input must be [N, C, *spatial], got shape {tuple(x.shape)}")
    spatial = tuple(int(s) for s in x.shape[2:])
    n_dims = len(spatial)
    if mode not in BLEND_MODES:
        raise AhmError(f"sliding window: unknown blend mode {mode!r}; choose {' or '.join(BLEND_MODES)}")
    if not 0.0 <= float(overlap) < 1.0:
        raise AhmError(f"sliding window: overlap must be in [0, 1), got {overlap}")
    if int(sw_batch_size) < 1:
        raise AhmError(f"sliding window: sw_batch_size must be at least 1, got {sw_batch_size}")
    multiple = _as_tuple(divisible_by, n_dims, "divisible_by") if divisible_by is not None else None
    roi = _as_tuple(roi_size, n_dims, "roi_size") if roi_size is not None else None
    if roi is not None and multiple is not None and any(r % m for r, m in zip(roi, multiple)):
        raise AhmError(f"sliding window: window {roi} is not a multiple of {multiple}, which the network needs")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else x.device
    device = torch.device(device)
    out_device = torch.device(output_device) if output_device is not None else x.device
    predictor = _predictor(model, check_precision(precision, device), device)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if roi is None:
                widths = DivisiblePad(multiple).compute_pad_width(spatial)[1:] if multiple else [(0, 0)] * n_dims
                y = _forward_padded(predictor, x, widths, device, out_device)
            elif all(s <= r for s, r in zip(spatial, roi)):
                y = _forward_padded(predictor, x, SpatialPad(roi).compute_pad_width(spatial)[1:], device, out_device)
            else:
                y = sliding_window_inference(x, roi, int(sw_batch_size), predictor, overlap=float(overlap), mode=mode,
                                             padding_mode="constant", cval=0.0, sw_device=device,
                                             device=out_device)
                if not isinstance(y, torch.Tensor):
                    raise AhmError("sliding window: the network must return one tensor of logits")
                y = y.as_tensor() if hasattr(y, "as_tensor") else y  # a MONAI MetaTensor: plain tensor
            if probabilities:
                y = torch.softmax(y.float(), dim=1)
    finally:
        model.train(was_training)
    if tuple(y.shape[2:]) != spatial:
        raise AhmError(f"inference: network output {tuple(y.shape[2:])} does not match input {spatial}; "
                       f"does the network need inputs divisible by its strides (divisible_by)?")
    return y
