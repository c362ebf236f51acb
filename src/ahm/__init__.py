"""ahm: self-supervised medical image segmentation with reinforcement-learned adaptive masking.

The Python API (`ahm.api`) is imported on first use, so that `import ahm` and the command line start without
torch and MONAI:

    import ahm
    pre = ahm.pretrain({"data": {"path": "brain"}, "masking": {"policy": "ahm"}}, out="runs/pre")
"""

from __future__ import annotations

from typing import Any

from ahm.errors import AhmError
from ahm.version import __version__

_API = ("pretrain", "finetune", "evaluate", "predict", "load_encoder", "load_segmenter", "read_summary",
        "PretrainResult", "FinetuneResult", "EvaluationResult", "PredictionResult")

__all__ = ["AhmError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from ahm import api

        return getattr(api, name)
    raise AttributeError(f"module 'ahm' has no attribute {name!r}")
