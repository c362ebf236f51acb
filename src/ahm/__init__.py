"""ahm: self-supervised medical image segmentation with reinforcement-learned adaptive masking."""

from ahm.errors import AhmError

__version__ = "0.2.0"

__all__ = ["AhmError", "__version__"]
