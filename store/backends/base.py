"""The backend contract and the registry that picks a backend from a path."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from ..toolbox import fs
from ..toolbox.errors import StoreError
from ..toolbox.registry import Registry
from ..schema import Samples, StoreMeta

_REGISTRY: Registry[type["Backend"]] = Registry("store backend", StoreError, key=lambda cls: cls.name)
register_backend = _REGISTRY.register  # class decorator: a backend available by its `name`


def list_backends() -> list[str]:
    """Names of the registered backends."""
    return _REGISTRY.names()


def get_backend(name: str) -> type["Backend"]:
    """The backend class registered under `name`."""
    return _REGISTRY.get(name)


def backend_for_existing(path: str) -> type["Backend"]:
    """Pick the backend that wrote the store at `path`, or say why there is no store there."""
    if not fs.exists(path):
        raise StoreError(f"no store at {path}: the path does not exist; check it, or create one with `dfkd synth`")
    if not fs.isdir(path):
        raise StoreError(f"{path} is a file, not a dfkd store (a store is a directory: *.zarr or a WebDataset folder)")
    for cls in _REGISTRY.values():
        if cls.recognizes(path):
            return cls
    raise StoreError(f"{path} is not a dfkd store (no zarr.json or meta.json inside); "
                     "point to a store written by dfkd, or create one with `dfkd synth`")


def backend_for_new(path: str, name: str | None) -> type["Backend"]:
    """The backend to create at `path`: the one named, else the one whose suffix the path has, else Zarr."""
    if name is not None:
        return get_backend(name)
    for cls in _REGISTRY.values():
        if any(path.rstrip("/").endswith(s) for s in cls.suffixes):
            return cls
    return get_backend("zarr")


class Backend(ABC):
    """One physical layout of a store. Knows arrays and files, nothing about models."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, path: str, meta: StoreMeta, writable: bool) -> None:
        self.path = path
        self.meta = meta
        self.writable = writable

    @classmethod
    @abstractmethod
    def recognizes(cls, path: str) -> bool:
        """Whether the directory at `path` was laid out by this backend."""

    @classmethod
    def half_created(cls, path: str) -> bool:
        """Whether `path` holds this backend's store as a killed creation left it (metadata, not all arrays)."""
        return False

    @classmethod
    @abstractmethod
    def create(cls, path: str, meta: StoreMeta, **options: Any) -> "Backend":
        """Create an empty store at its final size (every unit pending)."""

    @classmethod
    @abstractmethod
    def open(cls, path: str, writable: bool = False) -> "Backend":
        """Open an existing store, refusing foreign or mismatched ones with one line."""

    @abstractmethod
    def done_mask(self) -> np.ndarray:
        """One bool per write unit: True once the unit is completely written."""

    @abstractmethod
    def read_unit(self, unit: int, check: bool = True, with_views: bool = True) -> Samples:
        """All samples of one unit, read as one whole chunk (or shard); refused when they do not match the
        checksums written with the unit's done flag, unless `check` is False (verify's content checks). Its
        view labels come too where they are written, unless `with_views` is False (then they are not read)."""

    def read_targets(self, unit: int, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(logits, labels) of one unit, checked as read_unit checks; backends that can skip the images do."""
        rec = self.read_unit(unit, check=check)
        return rec.logits, rec.labels

    @abstractmethod
    def write_unit(self, unit: int, samples: Samples) -> None:
        """Write one whole unit, then mark it done; a crash before the mark leaves it pending."""

    def views_done_mask(self) -> np.ndarray:
        """One bool per write unit: True once the unit's view labels are written (all False without views)."""
        return np.zeros(self.meta.num_units, dtype=bool)

    def read_views(self, unit: int, check: bool = True) -> np.ndarray:
        """The view logits of one unit (N×V×K), refused when they do not match the checksum kept with them."""
        raise StoreError(f"{self.path} keeps no view labels; add them with `dfkd store label`")

    def add_views(self, meta: StoreMeta) -> None:
        """Start keeping view labels as `meta` describes them (every unit's views pending)."""
        raise StoreError(f"the {self.name} backend cannot add view labels to an existing store")

    def write_views(self, unit: int, views: np.ndarray) -> None:
        """Write the view labels of one finished unit, then mark them done."""
        raise StoreError(f"the {self.name} backend cannot add view labels to an existing store")

    def checksum_table(self) -> list[list[int]] | None:
        """Every unit's checksums as kept with its done flag (None where the backend keeps none)."""
        return None

    @property
    def checked(self) -> bool:
        """Whether the store was written with checksums beside every unit's done flag (reads refuse units without
        them unless asked not to check: a store without any is reported unverifiable)."""
        return True

    def mark_pending(self, unit: int) -> None:
        """Take back a unit's done mark (its data were found damaged), so a resume writes it again."""
        raise NotImplementedError

    def finalize(self) -> None:
        """Called once after the last unit: consolidate metadata where the backend has any."""

    def options(self) -> dict[str, Any]:
        """Backend-specific layout options (compression, image encoding) for info and convert."""
        return {}

    def audit(self) -> list[tuple[bool, str]]:
        """Layout findings beyond what `open` refuses, as (is_problem, message): stray files, leftovers."""
        return []

    def clear_partials(self) -> None:
        """Remove leftovers of interrupted writes before a resume."""
