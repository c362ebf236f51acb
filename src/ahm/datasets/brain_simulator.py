"""The subject simulator behind `ahm data prepare brain-subjects` (`ahm.datasets.brain_subjects`): one subject's
anatomy, contrast and scan drawn from its own random stream, sampled on slice planes or on a whole volume grid."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Any

import numpy as np

from ahm.datasets.brain_demo import (
    read_bundled,
    read_with_loaders,
    tissue_labels,
)
from ahm.errors import AhmError

AXIS_LETTERS = "xyz"
_REDRAWS = 100  # contrast draws before the last one is kept whatever its separation


@dataclass(frozen=True)
class SimulationSettings:
    """What varies between simulated subjects (ranges are drawn uniformly per subject unless said otherwise)."""

    fov_mm: float = 192.0  # side of the square field of view of every slice
    slice_span: float = 0.6  # slices cover the central +- this share of the brain's half-extent per axis
    rotate_deg: float = 8.0  # affine: rotation about each axis, up to +- this
    scale: float = 0.08  # affine: per-axis scale in 1 +- this
    shift_mm: float = 6.0  # affine: translation per axis, up to +- this
    deform_points: int = 5  # nonlinear: control points per axis over the field of view
    deform_mm: float = 5.0  # nonlinear: standard deviation of each control point's displacement
    remap_knots: int = 5  # T1 contrast: knots of the random monotone (PCHIP) intensity curve
    remap_concentration: float = 2.0  # Dirichlet concentration of its steps (smaller: wilder curves)
    gmm_share: float = 0.4  # share of subjects with a per-tissue Gaussian-mixture contrast instead
    gmm_mean: tuple[float, float] = (0.1, 1.0)  # range of each tissue's mean intensity
    gmm_sd: tuple[float, float] = (0.01, 0.05)  # range of each tissue's intensity spread
    # Least difference between the grey and white matter levels (0..1, before bias and noise), in either
    # order, under both contrasts (half of it between CSF and the nearer tissue under the mixture): a draw that
    # misses it is drawn again, so no subject is a scan in which the tissues cannot be told apart at all.
    min_contrast: float = 0.2
    bias_points: int = 4  # bias field: control points per axis
    bias_sd: float = 0.25  # bias field: standard deviation of its log at each control point
    blur_px: tuple[float, float] = (0.0, 1.0)  # in-plane Gaussian blur sigma, pixels
    noise_sd: tuple[float, float] = (0.01, 0.04)  # noise standard deviation, of the brain's 99th percentile

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SimulationSettings:
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise AhmError(f"simulation setting {unknown[0]!r} is unknown; known: {', '.join(names)}")
        typed = {}
        for key, value in values.items():
            default = getattr(cls(), key)
            try:
                if isinstance(default, tuple):
                    low, high = (float(v) for v in value)
                    if low > high:
                        raise ValueError
                    typed[key] = (low, high)
                elif isinstance(default, int):
                    typed[key] = int(value)
                else:
                    typed[key] = float(value)
            except (TypeError, ValueError):
                raise AhmError(f"simulation setting {key}: {value!r} is not a valid value "
                               f"(like the default {default!r})") from None
        return replace(cls(), **typed)


@dataclass
class Template:
    """The 1 mm MNI152 2009 T1 image (0..1) and its tissue probabilities, lightly smoothed for resampling."""

    t1: np.ndarray
    probs: dict[str, np.ndarray]  # csf, gm, wm
    centre: np.ndarray  # voxel index of the brain's bounding-box centre
    half_extent: np.ndarray  # half of the brain's bounding box, mm per axis
    levels: dict[str, float]  # median T1 (0..1) where grey, white matter is the most likely tissue


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Read nilearn's bundled template once per process (no network)."""
    from scipy.ndimage import gaussian_filter

    try:
        volumes = read_bundled() or read_with_loaders()
    except ImportError as exc:
        raise AhmError("brain subjects: needs nilearn (pip install 'ahm[demo]' or pip install nilearn)") from exc
    except Exception as exc:  # a broken nilearn install: one line
        raise AhmError(f"brain subjects: could not load nilearn's MNI152 template ({type(exc).__name__}: {exc})") \
            from exc
    t1 = volumes["t1"]
    gm = volumes["gm"] / max(float(volumes["gm"].max()), 1e-6)
    wm = volumes["wm"] / max(float(volumes["wm"].max()), 1e-6)
    brain = (t1 > 0).astype(np.float32)
    t1 = t1 / max(float(np.percentile(t1[brain > 0], 99.5)), 1e-6)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    # Slices are sampled at ~1.5 mm from the 1 mm grid: a little smoothing first stands in for the area average,
    # so the thin grey ribbon is not aliased.
    sigma = 0.6
    smooth = {name: gaussian_filter(v.astype(np.float32), sigma) for name, v in
              (("t1", t1), ("csf", csf), ("gm", gm), ("wm", wm))}
    inside = np.argwhere(gm + wm >= 0.5)
    low, high = inside.min(axis=0), inside.max(axis=0)
    levels = {"gm": float(np.median(t1[(gm >= 0.5) & (gm > wm)])), "wm": float(np.median(t1[(wm >= 0.5) & (wm > gm)]))}
    return Template(t1=smooth["t1"], probs={k: smooth[k] for k in ("csf", "gm", "wm")},
                    centre=(low + high) / 2.0, half_extent=(high - low) / 2.0, levels=levels)


def _field_grid(rng: np.random.Generator, points: int, sd: float, components: int) -> np.ndarray:
    """The control values of a smooth random field: N(0, sd) on a `points`^3 grid, [components, p, p, p]."""
    return rng.normal(0.0, sd, size=(components, points, points, points))


def _field_at(grid: np.ndarray, coords: np.ndarray, fov: float) -> np.ndarray:
    """The field of `grid` (spanning the field of view) at `coords` ([..., 3] mm, centred), interpolated by
    cubic splines. Returns [components, ...]; a pure function, so a volume can be evaluated in chunks."""
    from scipy.ndimage import map_coordinates

    points = grid.shape[1]
    index = (coords / fov + 0.5) * (points - 1)  # -fov/2 -> 0, +fov/2 -> points-1
    flat = index.reshape(-1, 3).T
    out = np.stack([map_coordinates(grid[c], flat, order=3, mode="nearest") for c in range(grid.shape[0])])
    return out.reshape((grid.shape[0],) + coords.shape[:-1])


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _monotone_curve(rng: np.random.Generator, knots: int, concentration: float) -> Callable[[np.ndarray], np.ndarray]:
    """A random smooth increasing map of [0, 1] onto [0, 1]: PCHIP through knots with Dirichlet steps."""
    from scipy.interpolate import PchipInterpolator

    steps = rng.dirichlet(np.full(knots, concentration))
    x = np.linspace(0.0, 1.0, knots + 1)
    y = np.concatenate([[0.0], np.cumsum(steps)])
    curve = PchipInterpolator(x, y)
    return lambda v: curve(np.clip(v, 0.0, 1.0))


class BrainSimulator:
    """Simulated subjects from one seed; `subject(k)` is a pure function of (seed, k, settings, sizes)."""

    def __init__(self, seed: int = 0, image_size: int = 128, slices_per_axis: int = 8,
                 settings: SimulationSettings | None = None) -> None:
        if not 32 <= image_size <= 512:
            raise AhmError(f"--image-size must be between 32 and 512, got {image_size}")
        if not 1 <= slices_per_axis <= 64:
            raise AhmError(f"--slices-per-axis must be between 1 and 64, got {slices_per_axis}")
        self.seed = seed
        self.image_size = image_size
        self.slices_per_axis = slices_per_axis
        self.settings = settings or SimulationSettings()
        self.template = load_template()

    def _plane_coords(self, axis: int, offsets: np.ndarray) -> np.ndarray:
        """Subject-space points (mm, centred) of the slices along `axis` at `offsets` mm: [n, S, S, 3].

        Orientation as brain_demo writes its slices: superior (or anterior, on axial slices) up."""
        size, fov = self.image_size, self.settings.fov_mm
        u = ((np.arange(size) + 0.5) / size - 0.5) * fov  # columns, increasing
        v = -u  # rows: top of the image is the positive direction
        in_plane = {0: (2, 1), 1: (2, 0), 2: (1, 0)}[axis]  # (row axis, column axis)
        pts = np.zeros((len(offsets), size, size, 3))
        pts[..., axis] = offsets[:, None, None]
        pts[..., in_plane[0]] = v[None, :, None]
        pts[..., in_plane[1]] = u[None, None, :]
        return pts

    def subject_id(self, k: int) -> str:
        return f"sub{k:05d}"

    def _anatomy(self, k: int) -> dict[str, Any]:
        """Subject k's random stream and its anatomy, drawn first so the scan settings never change it."""
        if k < 0:
            raise AhmError(f"subject index must be >= 0, got {k}")
        s = self.settings
        rng = np.random.default_rng([self.seed, k])
        linear = _rotation(rng, s.rotate_deg) @ np.diag(rng.uniform(1 - s.scale, 1 + s.scale, size=3))
        shift = rng.uniform(-s.shift_mm, s.shift_mm, size=3)
        deform = _field_grid(np.random.default_rng(rng.integers(2**63)), s.deform_points, s.deform_mm, 3)
        bias = _field_grid(np.random.default_rng(rng.integers(2**63)), s.bias_points, s.bias_sd, 1)
        jitter = rng.uniform(-2.0, 2.0, size=3)  # where this subject's slice planes sit, mm
        return {"rng": rng, "linear": linear, "shift": shift, "deform": deform, "bias": bias, "jitter": jitter}

    def _warped(self, anatomy: dict[str, Any], pts: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The template's tissue probabilities and T1 at subject-space points `pts` [..., 3] mm, and the bias
        field there. The same field moves image and probabilities: it is drawn once over the whole field of
        view, so slices of every axis (and a whole volume) see one consistent 3D anatomy."""
        from scipy.ndimage import map_coordinates

        s, tpl = self.settings, self.template
        displacement = _field_at(anatomy["deform"], pts, s.fov_mm)
        template_pts = pts @ anatomy["linear"].T + anatomy["shift"] + np.moveaxis(displacement, 0, -1)
        index = (template_pts + tpl.centre).reshape(-1, 3).T

        def sample(volume: np.ndarray) -> np.ndarray:
            return map_coordinates(volume, index, order=1, mode="constant", cval=0.0).reshape(pts.shape[:-1])

        values = {name: np.clip(sample(v), 0.0, 1.0) for name, v in tpl.probs.items()}
        values["t1"] = sample(tpl.t1)
        return values, np.exp(_field_at(anatomy["bias"], pts, s.fov_mm)[0])

    def _scan(self, rng: np.random.Generator, values: dict[str, np.ndarray], bias: np.ndarray,
              blur_axes: tuple[bool, ...], texture_rng: np.random.Generator | None = None,
              skip_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Contrast, bias, blur and noise of one subject on sampled `values`: (pixels uint8, labels, info).

        `rng` draws the subject's scan settings. The per-point draws (texture, noise) come from `rng` itself
        for the slice set; for a volume they come from `texture_rng`, and `skip_shape` (the slice set's array
        shape) is drawn from `rng` and dropped in their place, so every scan setting drawn after them (blur,
        noise level) is the slice set's."""
        s, tpl = self.settings, self.template
        per_point = texture_rng if texture_rng is not None else rng
        labels = tissue_labels(np.stack([values["gm"], values["wm"]]))
        shape = labels.shape
        gmm = bool(rng.random() < s.gmm_share)
        if gmm:
            for _ in range(_REDRAWS):
                means = rng.uniform(*s.gmm_mean, size=3)  # csf, gm, wm
                if abs(means[1] - means[2]) >= s.min_contrast and \
                        min(abs(means[0] - means[1]), abs(means[0] - means[2])) >= s.min_contrast / 2:
                    break
            sds = rng.uniform(*s.gmm_sd, size=3)
            image = np.zeros(shape)
            for c, name in enumerate(("csf", "gm", "wm")):
                if skip_shape is not None:
                    rng.normal(0.0, 1.0, size=skip_shape)
                texture = per_point.normal(0.0, 1.0, size=shape)
                image += values[name] * (means[c] + sds[c] * texture)
        else:
            for _ in range(_REDRAWS):
                curve = _monotone_curve(rng, s.remap_knots, s.remap_concentration)
                if float(curve(np.array(tpl.levels["wm"])) - curve(np.array(tpl.levels["gm"]))) >= s.min_contrast:
                    break
            image = curve(values["t1"])
        image = image * bias
        blur = rng.uniform(*s.blur_px)
        if blur > 0:
            image = _blur(image, blur, blur_axes)
        brain = labels > 0
        scale = float(np.percentile(image[brain], 99.0)) if brain.any() else float(image.max())
        image = np.clip(image, 0.0, None) / max(scale, 1e-6)
        noise = rng.uniform(*s.noise_sd)
        # Magnitude images: noise on two channels, then the modulus (Rician), so the background is not zero.
        image = np.hypot(image + per_point.normal(0.0, noise, size=shape), per_point.normal(0.0, noise, size=shape))
        pixels = np.clip(np.round(image / max(float(image.max()), 1.0) * 255.0), 0, 255).astype(np.uint8)
        return pixels, labels, {"contrast": "gmm" if gmm else "t1-remap", "blur_px": blur, "noise_sd": noise}

    def _slice_shape(self) -> tuple[int, int, int]:
        return (3 * self.slices_per_axis, self.image_size, self.image_size)

    def subject(self, k: int) -> dict[str, Any]:
        """Subject k: {"id", "contrast", "slices": {stem: (image uint8 [S, S], label uint8 [S, S])}}."""
        s, tpl = self.settings, self.template
        anatomy = self._anatomy(k)
        n = self.slices_per_axis
        fractions = np.linspace(-s.slice_span, s.slice_span, n) if n > 1 else np.zeros(1)
        jitter = anatomy["jitter"]
        planes = [self._plane_coords(axis, fractions * tpl.half_extent[axis] + jitter[axis]) for axis in range(3)]
        pts = np.concatenate(planes)  # [3n, S, S, 3] subject space
        values, bias = self._warped(anatomy, pts)
        pixels, labels, info = self._scan(anatomy["rng"], values, bias, (False, True, True))  # in-plane blur
        sid = self.subject_id(k)
        slices = {}
        for axis in range(3):
            for j in range(n):
                row = axis * n + j
                slices[f"{sid}__{AXIS_LETTERS[axis]}{j:02d}"] = (pixels[row], labels[row])
        return {"id": sid, **info, "slices": slices}

    def volume(self, k: int, size: int = 128, spacing_mm: float = 1.5,
               chunk_points: int = 1 << 20) -> dict[str, Any]:
        """Subject k as a whole volume: {"id", "contrast", "image" uint8 [N, N, N], "label" uint8 [N, N, N],
        "affine" 4x4}, on an N^3 grid of `spacing_mm` voxels centred on the field of view.

        The same subject as `subject(k)`: the same anatomy (affine, deformation) and the same contrast and
        scan settings as the slice set written with this simulator's seed, image size and slices per axis;
        the per-voxel texture and noise are drawn from their own stream, and the blur is isotropic in voxels.
        The whole grid is warped in chunks of `chunk_points` points, so memory stays a few volumes."""
        check_grid(size, spacing_mm)
        anatomy = self._anatomy(k)
        centres = ((np.arange(size) + 0.5) / size - 0.5) * size * spacing_mm
        values: dict[str, np.ndarray] = {}
        bias = np.empty((size, size, size))
        step = max(1, chunk_points // (size * size))
        for start in range(0, size, step):
            xs = centres[start:start + step]
            pts = np.stack(np.meshgrid(xs, centres, centres, indexing="ij"), axis=-1)
            part, part_bias = self._warped(anatomy, pts)
            for name, v in part.items():
                values.setdefault(name, np.empty((size, size, size)))[start:start + len(xs)] = v
            bias[start:start + len(xs)] = part_bias
        pixels, labels, info = self._scan(anatomy["rng"], values, bias, (True, True, True),
                                          texture_rng=np.random.default_rng([self.seed, k, 1]),
                                          skip_shape=self._slice_shape())
        # World coordinates are the subject-space mm (the template's voxel axes, RAS in MNI152), voxel centres
        # at the grid points sampled above.
        affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
        affine[:3, 3] = centres[0]
        return {"id": self.subject_id(k), **info, "image": pixels, "label": labels, "affine": affine}


def check_grid(size: int, spacing_mm: float) -> None:
    if not 8 <= size <= 512:
        raise AhmError(f"--volume-size must be between 8 and 512 voxels, got {size}")
    if not 0.25 <= spacing_mm <= 10.0:
        raise AhmError(f"--spacing must be between 0.25 and 10 mm, got {spacing_mm}")


def _blur(image: np.ndarray, sigma: float, axes: tuple[bool, ...]) -> np.ndarray:
    """Gaussian blur of `sigma` pixels along the axes marked True only."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, sigma=tuple(sigma if a else 0 for a in axes))
