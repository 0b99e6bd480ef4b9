"""Pack one WebDataset shard (one write unit) with dfkd's ustar packer and with webdataset.TarWriter.

    python -m benchmarks.wds_writer [--samples 256] [--image 3,32,32] [--repeats 20]

Both get the same pre-encoded members (png, logits.npy, cls, json per sample) and write to memory, so the
table is the cost of the tar layer alone: what choosing webdataset's writer would change.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import webdataset as wds

from dfkd.store.backends import tar
from dfkd.store.backends.webdataset import _npy_bytes, _png_bytes


def members(n: int, shape: tuple[int, int, int]) -> list[tuple[str, dict[str, bytes]]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        out.append((f"{i:010d}", {"png": _png_bytes(img), "logits.npy": _npy_bytes(rng.normal(size=10).astype(np.float16)),
                                  "cls": str(i % 10).encode(), "json": b'{"index": %d, "unit": 0}' % i}))
    return out


def pack_dfkd(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    return tar.pack([(f"{key}.{ext}", data) for key, d in samples for ext, data in d.items()])


def pack_wds(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0.0, user="root", group="root") as sink:
        for key, d in samples:
            sink.write({"__key__": key, **d})
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--image", default="3,32,32")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.image.split(","))
    samples = members(a.samples, shape)
    print(f"one shard: {a.samples} samples of {a.image}, 4 members each, packed in memory, best of {a.repeats}")
    print("| writer | ms per shard | x dfkd | shard bytes |\n|---|---:|---:|---:|")
    base = None
    for name, fn in (("dfkd tar.pack", pack_dfkd), ("webdataset.TarWriter", pack_wds)):
        best, size = float("inf"), 0
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            size = len(fn(samples))
            best = min(best, time.perf_counter() - t0)
        base = base or best
        print(f"| {name} | {1000 * best:.2f} | {best / base:.2f} | {size} |")


if __name__ == "__main__":
    main()
