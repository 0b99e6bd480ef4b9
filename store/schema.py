"""The one logical store format shared by every backend: metadata, samples and their validation."""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .toolbox.errors import StoreError

SCHEMA_VERSION = 1
FORMAT_NAME = "dfkd-store"
LOGITS_DTYPES = ("float16", "float32")
MAX_SAMPLE_BYTES = 2**26  # one image (C x H x W uint8): 64 MiB, a 4096 x 4096 x 4 image
MAX_CLASSES = 10**6
MAX_UNIT_BYTES = 2**32  # one unit's images, logits and view logits, as readers hold them: 4 GiB
MAX_UNITS = 10**7  # write units a store may declare: 2.56e9 images at the default 256; a done mask of 10 MB
MAX_VIEWS = 256  # view labels per image: 32 is the most measured (BENCHMARKS.md); 256 x K logits an image is plenty


@dataclass(frozen=True)
class StoreMeta:
    """Shape, size and provenance of a store; serialized as plain JSON into the store itself."""

    num_samples: int
    image_shape: tuple[int, int, int]
    num_classes: int
    unit_size: int
    logits_dtype: str = "float16"
    base_seed: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    views: int = 0  # teacher logits stored per image on this many seeded augmented views (store/views.py)
    view_recipe: dict[str, Any] | None = None  # how those views are drawn (ViewRecipe.to_json)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        if self.std is not None:
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise StoreError(f"image_shape must be (C, H, W) with positive sizes, got {self.image_shape}")
        if self.num_samples < 1:
            raise StoreError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_classes < 1:
            raise StoreError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.unit_size < 1:
            raise StoreError(f"unit_size must be >= 1, got {self.unit_size}")
        if not 0 <= self.views <= MAX_VIEWS:
            raise StoreError(f"views must lie in [0, {MAX_VIEWS}], got {self.views}")
        if math.prod(self.image_shape) > MAX_SAMPLE_BYTES:
            raise StoreError(f"images of {self.image_shape} are more than {MAX_SAMPLE_BYTES >> 20} MiB each")
        if self.num_classes > MAX_CLASSES:
            raise StoreError(f"num_classes must be <= {MAX_CLASSES}, got {self.num_classes}")
        unit_bytes = min(self.unit_size, self.num_samples) * (math.prod(self.image_shape) + 4 * self.num_classes * (1 + self.views))
        if unit_bytes > MAX_UNIT_BYTES:  # a reader holds a whole unit: the files could not hold it anyway
            raise StoreError(f"units of {min(self.unit_size, self.num_samples)} samples would take {unit_bytes / 2**30:.0f} GiB each (more "
                             f"than {MAX_UNIT_BYTES >> 30} GiB); use smaller units (--batch-size)")
        if -(-self.num_samples // self.unit_size) > MAX_UNITS:  # every reader loops over the units' done flags
            raise StoreError(f"{self.num_samples} samples in units of {self.unit_size} make more than {MAX_UNITS} "
                             "units; use larger units (--batch-size)")
        if self.logits_dtype not in LOGITS_DTYPES:
            raise StoreError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {self.logits_dtype!r}")
        if self.views and self.view_recipe is None:
            raise StoreError("a store with views must record their view_recipe")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.image_shape[0]:
                raise StoreError(f"{name} has {len(value)} values but images have {self.image_shape[0]} channels")

    @property
    def num_units(self) -> int:
        """How many write units the store is split into (the last one may be short)."""
        return math.ceil(self.num_samples / self.unit_size)

    def unit_range(self, unit: int) -> tuple[int, int]:
        """Sample index range [lo, hi) covered by one write unit."""
        if not 0 <= unit < self.num_units:
            raise StoreError(f"unit {unit} is outside [0, {self.num_units})")
        lo = unit * self.unit_size
        return lo, min(lo + self.unit_size, self.num_samples)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form stored as the group attributes / meta.json sidecar."""
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        d["mean"] = None if self.mean is None else list(self.mean)
        d["std"] = None if self.std is None else list(self.std)
        if not self.views:  # a store without views is written exactly as before views existed
            del d["views"], d["view_recipe"]
        return {"format": FORMAT_NAME, **d}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "StoreMeta":
        """Parse stored metadata, refusing foreign stores and other schema versions with one line."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise StoreError(f"{where} is not a dfkd store (no '{FORMAT_NAME}' metadata); "
                             "point to a store written by dfkd, or make one with `dfkd synth`")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{where} has store schema version {version}, this dfkd reads version "
                             f"{SCHEMA_VERSION}; use the dfkd release that wrote it, or re-create the store")
        keys = {k: v for k, v in d.items() if k != "format"}
        unknown = sorted(set(keys) - {f.name for f in fields(cls)})
        if unknown:  # a later release added metadata (as view labels once did): say so, not "corrupt"
            by = (d.get("provenance") or {}).get("dfkd_version") if isinstance(d.get("provenance"), dict) else None
            raise StoreError(f"{where} was written by a newer dfkd{f' ({by})' if by else ''} with metadata this "
                             f"release does not know ({', '.join(unknown)}); upgrade dfkd to read it")
        bad = _malformed(keys)
        if bad:
            raise StoreError(f"{where} has malformed dfkd metadata ({bad}); the store is corrupt, re-create it")
        try:
            return cls(**keys)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{where} has malformed dfkd metadata ({exc}); the store is corrupt, re-create it") from None
        except StoreError as exc:
            raise StoreError(f"{where} has malformed dfkd metadata ({exc}); the store is corrupt, re-create it") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_JSON_TYPES: dict[str, tuple[str, Any]] = {  # what each stored field must be, checked before anything is built
    "num_samples": ("an integer", _is_int), "num_classes": ("an integer", _is_int), "unit_size": ("an integer", _is_int),
    "base_seed": ("an integer", _is_int), "schema_version": ("an integer", _is_int), "views": ("an integer", _is_int),
    "logits_dtype": ("a string", lambda v: isinstance(v, str)),
    "image_shape": ("three integers", lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_is_int, v))),
    "mean": ("a list of numbers", lambda v: v is None or isinstance(v, (list, tuple)) and all(map(_is_number, v))),
    "std": ("a list of numbers", lambda v: v is None or isinstance(v, (list, tuple)) and all(map(_is_number, v))),
    "provenance": ("an object", lambda v: isinstance(v, dict)),
    "view_recipe": ("an object", lambda v: v is None or isinstance(v, dict)),
}


def _malformed(d: dict[str, Any]) -> str | None:
    """The first stored field of the wrong JSON type (a float sample count, a list for provenance), or None."""
    for key, (what, ok) in _JSON_TYPES.items():
        if key in d and not ok(d[key]):
            return f"{key} must be {what}, got {d[key]!r:.60}"
    return None


@dataclass
class Samples:
    """A run of consecutive samples: images uint8 N×C×H×W, logits N×K, labels int64 N (-1: none), and where
    the store keeps view labels, `views`: the teacher's logits of each image's V seeded views, N×V×K."""

    images: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    views: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def concat(cls, parts: list["Samples"]) -> "Samples":
        """Join several runs of samples in order (views kept when every run has them)."""
        views = None if any(p.views is None for p in parts) else np.concatenate([p.views for p in parts])
        return cls(np.concatenate([p.images for p in parts]),
                   np.concatenate([p.logits for p in parts]),
                   np.concatenate([p.labels for p in parts]), views)

    def take(self, index: np.ndarray | slice) -> "Samples":
        """Select samples by position."""
        return Samples(self.images[index], self.logits[index], self.labels[index],
                       None if self.views is None else self.views[index])


# Provenance keys that legitimately differ between the run that created a store and one that resumes it.
VOLATILE_KEYS = ("created",)


def plan_key(meta: StoreMeta) -> dict[str, Any]:
    """What must match for a resume to continue the same run: everything but volatile provenance (when it was
    made, and where the teacher file lay: the teacher is identified by its weights' fingerprint)."""
    d = meta.to_json()
    d["provenance"] = {k: v for k, v in meta.provenance.items() if k not in VOLATILE_KEYS}
    if isinstance(d["provenance"].get("teacher"), dict):
        d["provenance"]["teacher"] = {k: v for k, v in d["provenance"]["teacher"].items() if k != "path"}
    return d


def checksums(rec: Samples) -> np.ndarray:
    """CRC-32 of a unit's images, logits and labels bytes (uint32 ×3), kept with its done flag: a chunk
    lost or changed after the write no longer matches. Separate sums let a reader check targets alone."""
    return np.array([zlib.crc32(np.ascontiguousarray(a)) for a in (rec.images, rec.logits, rec.labels)],
                    dtype=np.uint32)


def view_checksum(views: np.ndarray) -> int:
    """CRC-32 of a unit's view logits, kept with its view flag (separate: views may be added to a finished unit)."""
    return zlib.crc32(np.ascontiguousarray(views))


def mismatch_error(path: str, meta: StoreMeta, unit: int, parts: list[str]) -> StoreError:
    """The one line for a unit whose bytes no longer match the checksums written with its done flag."""
    lo, hi = meta.unit_range(unit)
    return StoreError(f"{path}: unit {unit} (samples {lo}..{hi - 1}) does not match its checksum ({', '.join(parts)} "
                      "missing or damaged); rerun the synthesis with --resume, which re-makes exactly the damaged units")


def unchecked_error(path: str) -> StoreError:
    """The one line for a store whose units carry no checksums: nothing can tell its content from a tampered one."""
    return StoreError(f"{path} carries no checksums (made before dfkd wrote them, or stripped of them), so nothing "
                      f"tells its content from a tampered one; if you made it and trust it, `dfkd store convert "
                      f"{path} NEW --trust-unchecked` writes a checked copy")


def check_samples(meta: StoreMeta, rec: Samples, n: int, what: str) -> Samples:
    """Validate samples before anything is written; returns them in the store's dtypes."""
    c, h, w = meta.image_shape
    img, logits, labels = rec.images, np.asarray(rec.logits), np.asarray(rec.labels)
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        got = getattr(img, "dtype", type(img).__name__)
        raise StoreError(f"{what}: images must be a uint8 numpy array in pixel space [0, 255], got {got}; "
                         "quantize with (x * 255).round().clip(0, 255).astype(np.uint8)")
    if img.shape != (n, c, h, w):
        raise StoreError(f"{what}: images have shape {tuple(img.shape)}, the store expects {(n, c, h, w)} (N×C×H×W)")
    if logits.shape != (n, meta.num_classes):
        raise StoreError(f"{what}: logits have shape {tuple(logits.shape)}, the store expects {(n, meta.num_classes)}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise StoreError(f"{what}: logits must be floating point, got {logits.dtype}")
    if labels.shape != (n,):
        raise StoreError(f"{what}: labels have shape {tuple(labels.shape)}, the store expects {(n,)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise StoreError(f"{what}: labels must be integers, got {labels.dtype}")
    if n and (labels.min() < -1 or labels.max() >= meta.num_classes):
        raise StoreError(f"{what}: labels must lie in [-1, {meta.num_classes}) (-1 = no label), "
                         f"got values from {labels.min()} to {labels.max()}")
    with np.errstate(over="ignore"):  # overflow to inf is reported just below, as one line
        out_logits = logits.astype(meta.logits_dtype, copy=False)
    if not np.isfinite(out_logits).all():
        raise StoreError(f"{what}: logits contain NaN or inf (after casting to {meta.logits_dtype}); "
                         "check the teacher's outputs or store float32 logits")
    views = None if rec.views is None else check_views(meta, rec.views, n, what)
    if meta.views and views is None:
        raise StoreError(f"{what}: the store keeps {meta.views} view labels per image and these samples have none; "
                         "label the views with the teacher (dfkd.synth.view_labels.label_views) before writing")
    return Samples(np.ascontiguousarray(img), np.ascontiguousarray(out_logits),
                   labels.astype(np.int64, copy=False), views)


def check_views(meta: StoreMeta, views: Any, n: int, what: str) -> np.ndarray:
    """Validate one unit's view logits (n×V×K, finite) and return them in the store's logits dtype."""
    views = np.asarray(views)
    if not meta.views:
        raise StoreError(f"{what}: samples carry view labels but the store keeps none; add them with "
                         "`dfkd store label`, or write the samples without views")
    if views.shape != (n, meta.views, meta.num_classes):
        raise StoreError(f"{what}: view logits have shape {tuple(views.shape)}, the store expects "
                         f"{(n, meta.views, meta.num_classes)} (N×views×classes)")
    if not np.issubdtype(views.dtype, np.floating):
        raise StoreError(f"{what}: view logits must be floating point, got {views.dtype}")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(views.astype(meta.logits_dtype, copy=False))
    if not np.isfinite(out).all():
        raise StoreError(f"{what}: view logits contain NaN or inf (after casting to {meta.logits_dtype}); "
                         "check the teacher's outputs or store float32 logits")
    return out
