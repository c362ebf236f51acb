"""The data path of a run as one interface: 2D slices on the model grid (`SlicePipeline`) or whole volumes in 3D
(`VolumePipeline`), chosen once from `data.spatial_dims` by `pipeline_for`, the one place that looks at it.

Fine-tuning, validation, `ahm evaluate` and `ahm predict` ask the pipeline for their data, inference, scoring
and the fields a run records, the report, `ahm visualize` and the benches for their wording, pictures and cases,
and the pretraining corpus (`ahm.data.corpus`: samples, their store and size), `ahm data check` and `ahm data
index` for what a sample is, instead of asking which dimension they are in. It sits above `ahm.data` and the
scoring of `ahm.eval` (it composes them), and below `ahm.train`, `ahm.bench` and the commands of `ahm.eval` (they
ask it), so no import circle runs through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ahm.pipeline.base import Pipeline

__all__ = ["for_dims", "model_input_size", "pipeline_for"]


def for_dims(spatial_dims: int) -> Pipeline:
    """The pipeline of `spatial_dims` (2: slices, 3: volumes); anything else is refused in one line."""
    from ahm.errors import AhmError

    if int(spatial_dims) == 2:
        from ahm.pipeline.slices import SlicePipeline

        return SlicePipeline()
    if int(spatial_dims) == 3:
        from ahm.pipeline.volumes import VolumePipeline

        return VolumePipeline()
    raise AhmError(f"data.spatial_dims {spatial_dims}: choose 2 (images and slices) or 3 (whole volumes)")


def pipeline_for(cfg: Any) -> Pipeline:
    """The pipeline of a config: a run's (`cfg.data`), a `DataConfig`, or a loaded run (`spatial_dims`)."""
    data = getattr(cfg, "data", None)
    if data is not None and hasattr(data, "spatial_dims"):
        return for_dims(data.spatial_dims)
    return for_dims(cfg.spatial_dims)


def model_input_size(data: Any) -> int | tuple[int, ...]:
    """What a model is built for, of a `DataConfig`: the square image side in 2D, the training crop in 3D."""
    return pipeline_for(data).model_input_size(data)
