"""The on-disk stores of preprocessed pretraining samples behind `--cache DIR` (`ahm.data.corpus.SampleCache`):
`SliceStore`, one memory-mapped float32 array of every 2D sample on the model grid, and `VolumeStore`, one .npy
file per whole volume (preprocessed volumes differ in shape). The pipeline of the corpus chooses which
(`Pipeline.sample_store`); both are named by the corpus's digest `key`, so a changed corpus gets a new store."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np


class SampleStore(ABC):
    """Preprocessed samples kept on disk, entry by entry: `get` gives None until the entry is `put`."""

    path: Path  # where the samples are: a file, or a folder of files

    @abstractmethod
    def get(self, k: int) -> np.ndarray | None:
        """Entry `k` as stored, or None when it is not (completely) written."""

    @abstractmethod
    def put(self, k: int, image: np.ndarray) -> None:
        """Store entry `k`."""

    @abstractmethod
    def filled(self) -> int:
        """How many entries are stored."""


class SliceStore(SampleStore):
    """2D samples `[channels, image_size, image_size]` in one memory-mapped float32 file
    (`samples-<key>.f32`) and a byte per entry saying it is filled (`samples-<key>.filled`), both sparse until
    written; the data is written before its flag, so a sample half written by a killed run is computed again."""

    def __init__(self, folder: Path, key: str, entries: int, channels: int, image_size: int) -> None:
        shape = (entries, channels, image_size, image_size)
        self.data_path, self.flag_path = folder / f"samples-{key}.f32", folder / f"samples-{key}.filled"
        for path, size in ((self.data_path, int(np.prod(shape)) * 4), (self.flag_path, entries)):
            if not path.is_file() or path.stat().st_size != size:
                with open(path, "wb") as fh:  # sparse: the disk fills as samples are written
                    fh.truncate(size)
        self.path = self.data_path
        self.shape = shape
        self._data: np.memmap | None = None
        self._flags: np.memmap | None = None

    def _open(self) -> tuple[np.memmap, np.memmap]:
        # Opened lazily in each process (a loader worker maps the files itself).
        if self._data is None or self._flags is None:
            self._data = np.memmap(self.data_path, dtype=np.float32, mode="r+", shape=self.shape)
            self._flags = np.memmap(self.flag_path, dtype=np.uint8, mode="r+", shape=(self.shape[0],))
        return self._data, self._flags

    def get(self, k: int) -> np.ndarray | None:
        data, flags = self._open()
        return np.array(data[k]) if flags[k] else None

    def put(self, k: int, image: np.ndarray) -> None:
        data, flags = self._open()
        data[k] = image
        flags[k] = 1

    def filled(self) -> int:
        return int(np.count_nonzero(self._open()[1]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None, "_flags": None}


class VolumeStore(SampleStore):
    """Whole preprocessed volumes, one `<k>.npy` per entry in `volumes-<key>/`, each written atomically."""

    def __init__(self, folder: Path, key: str) -> None:
        self.volumes_dir = folder / f"volumes-{key}"
        self.volumes_dir.mkdir(exist_ok=True)
        self.path = self.volumes_dir

    def get(self, k: int) -> np.ndarray | None:
        path = self.volumes_dir / f"{k}.npy"
        try:
            return np.load(path, allow_pickle=False) if path.is_file() else None
        except (OSError, ValueError):  # a file cut short by a killed run is computed again
            return None

    def put(self, k: int, image: np.ndarray) -> None:
        from ahm.io import atomic_write

        atomic_write(self.volumes_dir / f"{k}.npy", lambda fh: np.save(fh, image, allow_pickle=False))

    def filled(self) -> int:
        return sum(1 for _ in self.volumes_dir.glob("*.npy"))
