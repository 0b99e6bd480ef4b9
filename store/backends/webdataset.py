"""WebDataset backend: a folder of tar shards, one shard per write unit, each published whole (atomic
rename on local disks, one PUT on object stores), so the shards' presence is the done mask."""

from __future__ import annotations

import functools
import io
import json
import re
from typing import Any

import numpy as np
from PIL import Image

from ..toolbox import fs
from ..toolbox.errors import StoreError
from ..schema import (Samples, StoreMeta, check_views, checksums, mismatch_error, unchecked_error,
                      view_checksum)
from . import tar
from .base import Backend, register_backend
from ..backend_choices import IMAGE_FORMATS

META_FILE = "meta.json"
PREFIX = "shard"
# Members a dfkd shard may hold; anything else (notably pickles: .pyd, .pkl) is refused, never decoded.
IMAGE_EXTS = set(IMAGE_FORMATS)
KNOWN_EXTS = IMAGE_EXTS | {"logits.npy", "views.npy", "cls", "json"}


META_LIMIT = 64 << 20  # meta.json: the plan and provenance, kilobytes in practice


def shard_limit(meta: StoreMeta) -> int:
    """The most bytes one shard of this plan can take: each sample's image at twice its raw size (PNG of noise
    grows a little), its logits and view logits at 8 bytes a value, 8 KB of tar headers, padding and JSON."""
    per_sample = 2 * int(np.prod(meta.image_shape)) + (1 + meta.views) * meta.num_classes * 8 + 8192
    return meta.unit_size * per_sample + (1 << 20)


def _read(where: str, most: int) -> bytes:
    """One of the store's files, which must be a regular file inside it (never a link, FIFO or device) and no
    longer than `most` bytes (a sparse file of a few KB on disk can read as gigabytes)."""
    try:
        return fs.read_bytes(where, regular=True, most=most)
    except fs.NotRegularFile as exc:
        raise StoreError(f"{where} is {exc.strerror}; a store holds only regular files: remove it (and finish the "
                         "store with --resume if it was a shard)") from None
    except fs.TooLarge as exc:
        raise StoreError(f"{where} is {exc.strerror}; it is damaged or foreign: remove it (and finish the store "
                         "with --resume if it was a shard)") from None


def shard_name(unit: int) -> str:
    """File name of the shard that holds one write unit."""
    return f"{PREFIX}-{unit:06d}.tar"


_SHARD_RE = re.compile(rf"^{PREFIX}-(\d{{6,}})\.tar$")


@functools.lru_cache(maxsize=16)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The .npy header np.save writes for this dtype and shape (cached: np.save costs ~40 µs a call)."""
    buf = io.BytesIO()
    empty = np.zeros(shape, dtype)
    np.save(buf, empty, allow_pickle=False)
    return buf.getvalue()[: len(buf.getvalue()) - empty.nbytes]


def _npy_bytes(a: np.ndarray) -> bytes:
    """Exactly what np.save writes, built from a cached header."""
    return _npy_header(a.dtype.str, a.shape) + np.ascontiguousarray(a).tobytes()


def _npy_load(b: memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a .npy member; the expected header takes a fast path, any other header is read (never a pickle) and
    must declare this dtype and shape and hold their bytes: a header declaring a huge shape allocates nothing."""
    head = _npy_header(np.dtype(dtype).str, shape)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(b) == len(head) + nbytes and b[: len(head)] == head:
        return np.frombuffer(b, dtype, offset=len(head)).reshape(shape)
    f = io.BytesIO(b)
    try:  # numpy parses the header with Python's tokenizer, whose errors are no ValueError
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, fortran, got_dtype = read(f)
    except Exception as exc:  # noqa: BLE001 - any of numpy's ways to say the header is not one
        raise ValueError(f"a .npy header that cannot be read ({type(exc).__name__})") from None
    if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype) or fortran or len(b) - f.tell() != nbytes:
        raise ValueError(f"a .npy of {got_dtype}{tuple(got_shape)} in {len(b)} bytes, expected {dtype}{tuple(shape)}")
    return np.frombuffer(b, dtype, offset=f.tell()).reshape(shape)


def _png_bytes(img: np.ndarray) -> bytes:
    """Lossless PNG of one C×H×W uint8 image (C = 1 or 3)."""
    hwc = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(hwc)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _png_load(b: memoryview, shape: tuple[int, int, int]) -> np.ndarray:
    """Decode a PNG member whose header declares the store's image size (checked before decoding: a header of
    40000x40000 is refused, not inflated)."""
    try:
        img = Image.open(io.BytesIO(b), formats=["PNG"])
    except Image.DecompressionBombError as exc:
        raise ValueError(str(exc)) from None
    if img.size != (shape[2], shape[1]):
        raise ValueError(f"a PNG of {img.size[0]}x{img.size[1]}, the store's images are {shape[2]}x{shape[1]}")
    a = np.asarray(img)
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)


@register_backend
class WebDatasetBackend(Backend):
    """Per-sample members `<key>.png|npy`, `<key>.logits.npy`, `<key>.cls`, `<key>.json` (and `<key>.views.npy`,
    the V×K view logits, where the store keeps views) + a meta.json sidecar."""

    name = "webdataset"
    suffixes = (".wds",)

    def __init__(self, path: str, meta: StoreMeta, writable: bool, image_format: str,
                 checksummed: bool = True) -> None:
        super().__init__(path, meta, writable)
        self.image_format = image_format
        # every shard's first JSON holds its CRC-32s: a shard without them was altered, not merely old
        self.checksummed = checksummed

    @property
    def checked(self) -> bool:
        return self.checksummed

    @classmethod
    def recognizes(cls, path: str) -> bool:
        return fs.isfile(fs.join(path, META_FILE))

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
        fs.makedirs(path)
        backend = cls(path, meta, True, fmt)
        backend._write_meta()
        return backend

    def _write_meta(self) -> None:
        doc = {"dfkd": self.meta.to_json(),
               "webdataset": {"image_format": self.image_format, "shard_pattern": f"{PREFIX}-%06d.tar",
                              **({"unit_checksums": True} if self.checksummed else {})}}
        fs.write_atomic(fs.join(self.path, META_FILE), json.dumps(doc, indent=1, sort_keys=True).encode())

    def add_views(self, meta: StoreMeta) -> None:
        self.meta = meta  # shards without views members read as units whose views are pending
        self._write_meta()

    def views_done_mask(self) -> np.ndarray:
        mask = np.zeros(self.meta.num_units, dtype=bool)
        if self.meta.views:
            for u in self._units_on_disk():
                if u < len(mask):
                    mask[u] = self._has_views(u)
        return mask

    def _has_views(self, unit: int) -> bool:
        """Whether a shard was written with view labels: its first sample's JSON (the shard's done record) holds
        their checksum. Reads the shard but decodes no image; a damaged shard counts as without."""
        where = fs.join(self.path, shard_name(unit))
        try:
            for name, data in tar.members(_read(where, shard_limit(self.meta)), where):
                if name.endswith(".json"):
                    doc = json.loads(bytes(data))
                    return isinstance(doc, dict) and "view_checksum" in doc
        except (OSError, ValueError, RecursionError, StoreError):  # json nested past the stack: damaged too
            pass
        return False

    def read_views(self, unit: int, check: bool = True) -> np.ndarray:
        views = self.read_unit(unit, check).views
        if views is None:
            raise StoreError(f"{fs.join(self.path, shard_name(unit))} holds no view labels yet; add them with "
                             "`dfkd store label --resume`")
        return views

    def write_views(self, unit: int, views: np.ndarray) -> None:
        rec = self.read_unit(unit, with_views=False)
        rec.views = check_views(self.meta, views, len(rec), f"unit {unit} of {self.path}")
        self.write_unit(unit, rec)  # the whole shard again, published by one atomic rename

    @classmethod
    def open(cls, path: str, writable: bool = False) -> "WebDatasetBackend":
        try:
            doc = json.loads(_read(fs.join(path, META_FILE), META_LIMIT))
        except StoreError:
            raise
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested past the stack
            raise StoreError(f"{path}/{META_FILE} cannot be read ({type(exc).__name__}: {exc}); the store is corrupt, "
                             "re-create it") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{path} is not a dfkd store ({META_FILE} is not a JSON object)")
        meta = StoreMeta.from_json(doc.get("dfkd"), path)
        block = doc.get("webdataset") if isinstance(doc.get("webdataset"), dict) else {}
        fmt = block.get("image_format")
        if fmt not in IMAGE_FORMATS:
            raise StoreError(f"{path}: unknown image format {fmt!r} in {META_FILE}; the store is corrupt or foreign")
        return cls(path, meta, writable, fmt, checksummed=block.get("unit_checksums") is True)

    def _units_on_disk(self) -> dict[int, str]:
        out = {}
        for name in fs.listdir(self.path):
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

    def write_unit(self, unit: int, samples: Samples) -> None:
        lo, _ = self.meta.unit_range(unit)
        entries = []
        sums = checksums(samples).tolist()  # kept in the unit's first sample's JSON: its shard's done record
        head: dict[str, Any] = {"index": lo, "unit": unit, "unit_checksums": sums}
        if samples.views is not None:
            head["view_checksum"] = view_checksum(samples.views)
        for i in range(len(samples)):
            key = f"{lo + i:010d}"
            img = samples.images[i]
            entries += [
                (f"{key}.{self.image_format}", _png_bytes(img) if self.image_format == "png" else _npy_bytes(img)),
                (f"{key}.logits.npy", _npy_bytes(samples.logits[i])),
                (f"{key}.cls", str(int(samples.labels[i])).encode()),
                (f"{key}.json", json.dumps(head).encode() if i == 0
                 else b'{"index": %d, "unit": %d}' % (lo + i, unit)),
            ]
            if samples.views is not None:
                entries.append((f"{key}.views.npy", _npy_bytes(samples.views[i])))
        fs.write_atomic(fs.join(self.path, shard_name(unit)), tar.pack(entries))  # its appearance marks the unit done

    def read_unit(self, unit: int, check: bool = True, with_views: bool = True) -> Samples:
        lo, hi = self.meta.unit_range(unit)
        where = fs.join(self.path, shard_name(unit))
        try:
            buf = _read(where, shard_limit(self.meta))
        except FileNotFoundError:
            raise StoreError(f"{where} is missing: unit {unit} is not written; finish the store with --resume") from None
        n, (c, h, w), k = hi - lo, self.meta.image_shape, self.meta.num_classes
        images = np.empty((n, c, h, w), np.uint8)
        logits = np.empty((n, k), self.meta.logits_dtype)
        labels = np.empty(n, np.int64)
        seen = np.zeros((n, 3), dtype=bool)
        v = self.meta.views if with_views else 0
        views, seen_views = (np.empty((n, v, k), self.meta.logits_dtype), np.zeros(n, bool)) if v else (None, None)
        expected, expected_views = None, None
        for name, data in tar.members(buf, where):
            key, _, ext = name.partition(".")
            if ext not in KNOWN_EXTS:
                raise StoreError(f"{where} holds a foreign member {name!r}; dfkd never decodes such members "
                                 "(pickles are refused): the store is foreign, re-create it")
            if not key.isdigit() or not lo <= int(key) < hi:
                raise StoreError(f"{where}: member {name!r} does not belong to unit {unit} (samples {lo}..{hi - 1}); "
                                 "the store is corrupt, re-create it")
            i = int(key) - lo
            try:
                if ext in IMAGE_EXTS:
                    if ext != self.image_format:
                        raise StoreError(f"{where}: member {name!r} is {ext}, the store says {self.image_format}")
                    img = _png_load(data, (c, h, w)) if ext == "png" else _npy_load(data, "uint8", (c, h, w))
                    if img.shape != (c, h, w) or img.dtype != np.uint8:
                        raise StoreError(f"{where}: image {name!r} is {img.dtype}{img.shape}, the store expects "
                                         f"uint8{(c, h, w)}; the store is corrupt, re-create it")
                    images[i], seen[i, 0] = img, True
                elif ext == "logits.npy":
                    row = _npy_load(data, self.meta.logits_dtype, (k,))
                    if row.shape != (k,) or row.dtype != np.dtype(self.meta.logits_dtype):
                        raise StoreError(f"{where}: logits {name!r} are {row.dtype}{row.shape}, the store "
                                         f"expects {self.meta.logits_dtype}({k},)")
                    logits[i], seen[i, 1] = row, True
                elif ext == "views.npy":
                    if not v:
                        continue
                    rows = _npy_load(data, self.meta.logits_dtype, (v, k))
                    if views is None or rows.shape != (v, k) or rows.dtype != np.dtype(self.meta.logits_dtype):
                        raise StoreError(f"{where}: view logits {name!r} are {rows.dtype}{rows.shape}, the store "
                                         f"expects {self.meta.logits_dtype}({v}, {k})")
                    views[i], seen_views[i] = rows, True
                elif ext == "cls":
                    labels[i], seen[i, 2] = int(bytes(data)), True
                elif ext == "json" and i == 0:
                    doc = json.loads(bytes(data))
                    expected = doc.get("unit_checksums") if isinstance(doc, dict) else None
                    expected_views = doc.get("view_checksum") if isinstance(doc, dict) else None
            except StoreError:
                raise
            except (OSError, ValueError, SyntaxError, RecursionError) as exc:  # PIL, np.load, json: bad bytes
                raise StoreError(f"{where}: member {name!r} cannot be decoded ({type(exc).__name__}: {exc}); "
                                 "the shard is corrupt, delete it and finish the store with --resume") from None
        if not seen.all():
            missing = int((~seen.all(axis=1)).sum())
            raise StoreError(f"{where}: {missing} of {n} samples lack an image, logits or label; "
                             "the shard is corrupt, delete it and finish the store with --resume")
        if views is not None and not seen_views.all():
            if seen_views.any():
                raise StoreError(f"{where}: {int((~seen_views).sum())} of {n} samples lack their view labels; the "
                                 "shard is corrupt, label the store again with `dfkd store label --resume`")
            views = None  # a shard written before the store kept views: its views are pending
        rec = Samples(images, logits, labels, views)
        if check and not (isinstance(expected, list) and len(expected) == 3
                          and (views is None or expected_views is not None)):
            if not self.checksummed:
                raise unchecked_error(self.path)
            raise StoreError(f"{where} carries no checksums though every shard of this store is written with them: it "
                             "was altered after writing; delete it and finish the store with --resume")
        if check and isinstance(expected, list) and len(expected) == 3:
            bad = [k for k, a, b in zip(("images", "logits", "labels"), checksums(rec).tolist(), expected) if a != b]
            if views is not None and view_checksum(views) != expected_views:
                bad.append("view_logits")
            if bad:
                raise mismatch_error(self.path, self.meta, unit, bad)
        return rec

    def mark_pending(self, unit: int) -> None:
        fs.remove(fs.join(self.path, shard_name(unit)))  # the shard's presence is its done mark

    def options(self) -> dict[str, Any]:
        return {"image_format": self.image_format}

    def audit(self) -> list[tuple[bool, str]]:
        found = []
        for name in sorted(fs.listdir(self.path)):
            if fs.is_partial(name):
                found.append((False, f"leftover {name} from an interrupted write (harmless; removed on resume)"))
            elif name != META_FILE and not _SHARD_RE.match(name):
                found.append((True, f"foreign file {name} in the store folder"))
        for u in self._units_on_disk():
            if u >= self.meta.num_units:
                found.append((True, f"shard for unit {u} lies beyond the store's {self.meta.num_units} units"))
        return found

    def clear_partials(self) -> None:
        for name in fs.listdir(self.path):
            if fs.is_partial(name) and name != META_FILE + ".partial":
                fs.remove(fs.join(self.path, name))
