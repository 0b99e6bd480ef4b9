"""Store throughput: write, streaming read (0 and 2 workers) and in-RAM read, beside a raw .npy memmap floor.

    python -m benchmarks.store_throughput [--num-samples 50000] [--batch-size 256] [--unit-size 1024]
    python -m benchmarks.store_throughput --large [--large-samples 16384] [--unit-size 256]

Prints a Markdown table (images per second; higher is better). Data: uint8 images 3x32x32 of random
pixels (incompressible, as synthetic images nearly are), float16 logits x10, int64 labels. `--large`:
3x224x224 images (ImageNet scale, 150 kB each), more bytes than the loader's RAM limit, so the store is
streamed; made unit by unit (never whole in memory) and compared with a raw sequential read of the same
bytes from one flat file.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from dfkd import store
from dfkd.store.loader import DEFAULT_RAM_LIMIT


def timed(fn: Callable[[], int], repeats: int) -> float:
    """Median images/s of `fn` (which returns how many images it moved)."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def make_data(n: int, k: int, seed: int = 0, shape: tuple[int, int, int] = (3, 32, 32)) -> store.Samples:
    rng = np.random.default_rng(seed)
    return store.Samples(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                         rng.normal(size=(n, k)).astype(np.float16), rng.integers(0, k, n).astype(np.int64))


def write_store(path: str, data: store.Samples, unit_size: int, backend: str, **options) -> int:
    meta = store.StoreMeta(num_samples=len(data), image_shape=(3, 32, 32), num_classes=data.logits.shape[1],
                           unit_size=unit_size, logits_dtype="float16")
    w = store.create(path, meta, backend=backend, overwrite=True, **options)
    for u in w.pending_units():
        lo, hi = w.unit_range(u)
        w.write_unit(u, data.images[lo:hi], data.logits[lo:hi], data.labels[lo:hi])
    w.finalize()
    return len(data)


def epoch(ds: store.StoreDataset, workers: int | None) -> int:
    """One epoch through a DataLoader with `workers` processes, or straight from the dataset when None."""
    n = 0
    for b in ds if workers is None else DataLoader(ds, batch_size=None, num_workers=workers):
        n += len(b.indices)
    return n


def memmap_floor(dir_: str, data: store.Samples, batch_size: int) -> Callable[[], int]:
    """Sequential batches from raw .npy memmaps into tensors: the fastest a reader could be."""
    np.save(os.path.join(dir_, "images.npy"), data.images)
    np.save(os.path.join(dir_, "logits.npy"), data.logits)
    np.save(os.path.join(dir_, "labels.npy"), data.labels)

    def run() -> int:
        im = np.load(os.path.join(dir_, "images.npy"), mmap_mode="r")
        lg = np.load(os.path.join(dir_, "logits.npy"), mmap_mode="r")
        lb = np.load(os.path.join(dir_, "labels.npy"), mmap_mode="r")
        n = 0
        for i in range(0, len(im), batch_size):
            x, y, z = (torch.from_numpy(np.array(a[i:i + batch_size])) for a in (im, lg, lb))
            n += len(x)
        return n
    return run


def large_case(root: str, n: int, unit_size: int, batch_size: int, k: int, repeats: int) -> None:
    """Write and stream a 3x224x224 store larger than the RAM limit, beside a raw file read of the same bytes."""
    shape = (3, 224, 224)
    per = int(np.prod(shape)) + 2 * k + 8  # image + float16 logits + int64 label
    meta = store.StoreMeta(num_samples=n, image_shape=shape, num_classes=k, unit_size=unit_size, logits_dtype="float16")
    unit = lambda u: make_data(min(unit_size, n - u * unit_size), k, seed=u, shape=shape)
    rows = []
    raw = os.path.join(root, "raw.bin")
    units = [unit(u) for u in range(2)]  # content made once, alternated; writing it is what is timed
    for label, backend, options, name in (("zarr, lz4", "zarr", {"compressor": "lz4"}, "big-lz4.zarr"),
                                          ("zarr, none", "zarr", {"compressor": "none"}, "big-none.zarr"),
                                          ("webdataset, npy", "webdataset", {"image_format": "npy"}, "big-npy.wds")):
        path = os.path.join(root, name)
        w = store.create(path, meta, backend=backend, overwrite=True, **options)
        t = time.perf_counter()
        for u in w.pending_units():
            d = units[u % 2]
            w.write_unit(u, d.images, d.logits, d.labels)
        w.finalize()
        write = n / (time.perf_counter() - t)
        ds = lambda: store.StoreDataset(path, batch_size, seed=0)
        assert not ds().in_ram, "the large case must be streamed: raise --large-samples"
        s0 = timed(lambda: epoch(ds(), 0), repeats)
        s2 = timed(lambda: epoch(ds(), 2), repeats)
        rows.append((label, write, s0, s2))
        shutil.rmtree(path, ignore_errors=True)  # disk: one large store at a time
    with open(raw, "wb") as f:  # the floor's file: the same bytes, flat, in batch order
        for u in range(meta.num_units):
            d = units[u % 2]
            f.write(d.images.tobytes() + d.logits.tobytes() + d.labels.tobytes())

    def floor() -> int:
        m = 0
        with open(raw, "rb", buffering=0) as f:
            while True:
                buf = f.read(per * batch_size)
                if not buf:
                    return m
                torch.from_numpy(np.frombuffer(buf, np.uint8).copy())
                m += len(buf) // per
    fl = timed(floor, repeats)
    mb = per / 2**20
    print(f"large store: {n} samples of 3x224x224 uint8 + {k} float16 logits = {n * per / 2**30:.2f} GiB "
          f"(RAM limit {DEFAULT_RAM_LIMIT / 2**30:.0f} GiB: streamed), unit {unit_size}, batch {batch_size}; "
          f"{os.cpu_count()} cores; files just written, so reads come from the page cache for store and floor alike")
    print()
    print("| store | write img/s | write MB/s | stream img/s (0 workers) | MB/s | / floor | stream img/s (2 workers) "
          "| MB/s | / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, write, s0, s2 in rows:
        print(f"| {label} | {write:,.0f} | {write * mb:,.0f} | {s0:,.0f} | {s0 * mb:,.0f} | {s0 / fl:.2f} | {s2:,.0f} "
              f"| {s2 * mb:,.0f} | {s2 / fl:.2f} |")
    print(f"| raw sequential read of one flat file (floor) | | | {fl:,.0f} | {fl * mb:,.0f} | 1.00 | | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--unit-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="read epochs per measurement (median)")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--large", action="store_true", help="the 3x224x224 case, larger than the loader's RAM limit")
    p.add_argument("--large-samples", type=int, default=16_384)
    args = p.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="dfkd-bench-")
    os.makedirs(root, exist_ok=True)
    if args.large:
        try:
            large_case(root, args.large_samples, args.unit_size, args.batch_size, args.num_classes, args.repeats)
        finally:
            if args.dir is None:
                shutil.rmtree(root, ignore_errors=True)
        return
    data = make_data(args.num_samples, args.num_classes)
    configs = [("zarr, lz4", "zarr", {"compressor": "lz4"}, "s-lz4.zarr"),
               ("zarr, none", "zarr", {"compressor": "none"}, "s-none.zarr"),
               ("webdataset, png", "webdataset", {"image_format": "png"}, "s-png.wds"),
               ("webdataset, npy", "webdataset", {"image_format": "npy"}, "s-npy.wds")]
    rows: list[tuple] = []
    try:
        floor_fn = memmap_floor(root, data, args.batch_size)
        floors: list[float] = []
        for label, backend, options, name in configs:
            path = os.path.join(root, name)
            write = timed(lambda: write_store(path, data, args.unit_size, backend, **options), 1)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
            stream = lambda: store.StoreDataset(path, args.batch_size, in_ram=False, seed=0)
            s0 = timed(lambda: epoch(stream(), 0), args.repeats)
            s2 = timed(lambda: epoch(stream(), 2), args.repeats)
            t = time.perf_counter()
            ram_ds = store.StoreDataset(path, args.batch_size, in_ram=True, seed=0)
            load = len(ram_ds.units) and args.num_samples / (time.perf_counter() - t)
            # in-RAM and the floor alternate, so both see the same machine state; medians of each
            runs = [(timed(lambda: epoch(ram_ds, 0), 1), timed(lambda: epoch(ram_ds, None), 1), timed(floor_fn, 1))
                    for _ in range(2 * args.repeats + 1)]
            ram, direct, floor_here = (statistics.median(r[i] for r in runs) for i in range(3))
            floors.append(floor_here)
            rows.append((label, size / 2**20, write, s0, s2, load, ram, direct, ram / floor_here, direct / floor_here))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"store throughput: {args.num_samples} samples of 3x32x32 uint8 + {args.num_classes} float16 logits, "
          f"batch {args.batch_size}, unit {args.unit_size}; {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, zarr {__import__('zarr').__version__}")
    print()
    print("| store | size MiB | write img/s | stream img/s (0 workers) | stream img/s (2 workers) "
          "| load to RAM img/s | in-RAM read img/s (DataLoader) | in-RAM read img/s (direct) | in-RAM / floor (DataLoader, direct) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:,.0f} | {r[3]:,.0f} | {r[4]:,.0f} | {r[5]:,.0f} | {r[6]:,.0f} "
              f"| {r[7]:,.0f} | {r[8]:.2f}, {r[9]:.2f} |")
    print(f"| raw .npy memmap (floor: sequential batches; median beside each row) | | | | | | "
          f"{statistics.median(floors):,.0f} | | 1.00 |")


if __name__ == "__main__":
    main()
