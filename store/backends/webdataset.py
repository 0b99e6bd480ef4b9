"""WebDataset backend: a folder of tar shards, one shard per write unit, published by atomic rename."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from typing import Any

import numpy as np
from PIL import Image

from ..errors import StoreError
from ..schema import Records, StoreMeta
from .base import Backend, register_backend

META_FILE = "meta.json"
PREFIX = "shard"
IMAGE_FORMATS = ("png", "npy")
# Members a dfkd shard may hold; anything else (notably pickles: .pyd, .pkl) is refused, never decoded.
IMAGE_EXTS = {"png", "npy"}
KNOWN_EXTS = IMAGE_EXTS | {"logits.npy", "cls", "json"}


def shard_name(unit: int) -> str:
    """File name of the shard that holds one write unit."""
    return f"{PREFIX}-{unit:06d}.tar"


_SHARD_RE = re.compile(rf"^{PREFIX}-(\d{{6,}})\.tar$")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def _png_bytes(img: np.ndarray) -> bytes:
    """Lossless PNG of one C×H×W uint8 image (C = 1 or 3)."""
    hwc = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(hwc)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _png_load(b: bytes) -> np.ndarray:
    a = np.asarray(Image.open(io.BytesIO(b)))
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A reproducible tar member: mtime 0, root owner, read-only."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


@register_backend
class WebDatasetBackend(Backend):
    """Per-sample members `<key>.png|npy`, `<key>.logits.npy`, `<key>.cls`, `<key>.json` + a meta.json sidecar."""

    name = "webdataset"
    suffixes = (".wds",)

    def __init__(self, path: str, meta: StoreMeta, writable: bool, image_format: str) -> None:
        super().__init__(path, meta, writable)
        self.image_format = image_format

    @classmethod
    def recognizes(cls, path: str) -> bool:
        return os.path.isfile(os.path.join(path, META_FILE))

    @classmethod
    def create(cls, path: str, meta: StoreMeta, *, image_format: str | None = None,
               **options: Any) -> "WebDatasetBackend":
        if options:
            raise StoreError(f"the webdataset backend has no option(s) {sorted(options)}; it takes image_format")
        fmt = image_format or ("png" if meta.image_shape[0] in (1, 3) else "npy")
        if fmt not in IMAGE_FORMATS:
            raise StoreError(f"unknown image format {fmt!r}; choose one of {IMAGE_FORMATS}")
        if fmt == "png" and meta.image_shape[0] not in (1, 3):
            raise StoreError(f"PNG holds 1 or 3 channels, these images have {meta.image_shape[0]}; use image_format='npy'")
        os.makedirs(path, exist_ok=True)
        doc = {"dfkd": meta.to_json(), "webdataset": {"image_format": fmt, "shard_pattern": f"{PREFIX}-%06d.tar"}}
        tmp = os.path.join(path, META_FILE + ".partial")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(path, META_FILE))
        return cls(path, meta, True, fmt)

    @classmethod
    def open(cls, path: str, writable: bool = False) -> "WebDatasetBackend":
        try:
            with open(os.path.join(path, META_FILE)) as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}/{META_FILE} cannot be read ({exc}); the store is corrupt, re-create it") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{path} is not a dfkd store ({META_FILE} is not a JSON object)")
        meta = StoreMeta.from_json(doc.get("dfkd"), path)
        fmt = (doc.get("webdataset") or {}).get("image_format")
        if fmt not in IMAGE_FORMATS:
            raise StoreError(f"{path}: unknown image format {fmt!r} in {META_FILE}; the store is corrupt or foreign")
        return cls(path, meta, writable, fmt)

    def _units_on_disk(self) -> dict[int, str]:
        out = {}
        for name in os.listdir(self.path):
            m = _SHARD_RE.match(name)
            if m:
                out[int(m.group(1))] = name
        return out

    def done_mask(self) -> np.ndarray:
        mask = np.zeros(self.meta.num_units, dtype=bool)
        for u in self._units_on_disk():
            if u < len(mask):
                mask[u] = True
        return mask

    def write_unit(self, unit: int, records: Records) -> None:
        lo, _ = self.meta.unit_range(unit)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(len(records)):
                key = f"{lo + i:010d}"
                img = records.images[i]
                members = [
                    (f"{key}.{self.image_format}", _png_bytes(img) if self.image_format == "png" else _npy_bytes(img)),
                    (f"{key}.logits.npy", _npy_bytes(records.logits[i])),
                    (f"{key}.cls", str(int(records.labels[i])).encode()),
                    (f"{key}.json", json.dumps({"index": lo + i, "unit": unit}).encode()),
                ]
                for name, data in members:
                    tar.addfile(*_member(name, data))
        final = os.path.join(self.path, shard_name(unit))
        tmp = final + ".partial"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # the shard's appearance is the unit's completion mark

    def read_unit(self, unit: int) -> Records:
        lo, hi = self.meta.unit_range(unit)
        path = os.path.join(self.path, shard_name(unit))
        where = f"{path}"
        n = hi - lo
        c, h, w = self.meta.image_shape
        images = np.empty((n, c, h, w), np.uint8)
        logits = np.empty((n, self.meta.num_classes), self.meta.logits_dtype)
        labels = np.empty(n, np.int64)
        seen = np.zeros((n, 3), dtype=bool)
        try:
            with tarfile.open(path, mode="r:") as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if ext not in KNOWN_EXTS:
                        raise StoreError(f"{where} holds a foreign member {m.name!r}; dfkd never decodes "
                                         "such members (pickles are refused): the store is foreign, re-create it")
                    if not key.isdigit() or not lo <= int(key) < hi or not m.isfile():
                        raise StoreError(f"{where}: member {m.name!r} does not belong to unit {unit} "
                                         f"(samples {lo}..{hi - 1}); the store is corrupt, re-create it")
                    i = int(key) - lo
                    data = tar.extractfile(m).read()
                    if ext in IMAGE_EXTS:
                        if ext != self.image_format:
                            raise StoreError(f"{where}: member {m.name!r} is {ext}, the store says {self.image_format}")
                        img = _png_load(data) if ext == "png" else _npy_load(data)
                        if img.shape != (c, h, w) or img.dtype != np.uint8:
                            raise StoreError(f"{where}: image {m.name!r} is {img.dtype}{img.shape}, the store "
                                             f"expects uint8{(c, h, w)}; the store is corrupt, re-create it")
                        images[i], seen[i, 0] = img, True
                    elif ext == "logits.npy":
                        row = _npy_load(data)
                        if row.shape != (self.meta.num_classes,) or row.dtype != np.dtype(self.meta.logits_dtype):
                            raise StoreError(f"{where}: logits {m.name!r} are {row.dtype}{row.shape}, the store "
                                             f"expects {self.meta.logits_dtype}({self.meta.num_classes},)")
                        logits[i], seen[i, 1] = row, True
                    elif ext == "cls":
                        labels[i], seen[i, 2] = int(data), True
        except StoreError:
            raise
        except FileNotFoundError:
            raise StoreError(f"{where} is missing: unit {unit} is not written; finish the store with --resume") from None
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise StoreError(f"{where} cannot be decoded ({type(exc).__name__}: {exc}); the shard is corrupt, "
                             "delete it and finish the store with --resume") from None
        if not seen.all():
            missing = int((~seen.all(axis=1)).sum())
            raise StoreError(f"{where}: {missing} of {n} samples lack an image, logits or label; "
                             "the shard is corrupt, delete it and finish the store with --resume")
        return Records(images, logits, labels)

    def options(self) -> dict[str, Any]:
        return {"image_format": self.image_format}

    def audit(self) -> list[tuple[bool, str]]:
        found = []
        for name in sorted(os.listdir(self.path)):
            if name.endswith(".partial"):
                found.append((False, f"leftover {name} from an interrupted write (harmless; removed on resume)"))
            elif name != META_FILE and not _SHARD_RE.match(name):
                found.append((True, f"foreign file {name} in the store folder"))
        for u in self._units_on_disk():
            if u >= self.meta.num_units:
                found.append((True, f"shard for unit {u} lies beyond the store's {self.meta.num_units} units"))
        return found

    def clear_partials(self) -> None:
        for name in os.listdir(self.path):
            if name.endswith(".partial") and name != META_FILE + ".partial":
                os.remove(os.path.join(self.path, name))
