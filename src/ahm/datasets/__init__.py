"""Built-in data sets, generated offline: brain MRI slices from the MNI152 template (`brain_demo`) and simulated
brain MRI subjects (`brain_subjects`). They write ordinary dataset folders that `ahm.data` then reads."""

from ahm.datasets.brain_demo import prepare_brain_demo
from ahm.datasets.brain_subjects import (
    prepare_brain_subject_set,
    prepare_brain_subject_volumes,
    prepare_brain_subjects,
)

__all__ = ["prepare_brain_demo", "prepare_brain_subject_set", "prepare_brain_subject_volumes",
           "prepare_brain_subjects"]
