"""The files a synthesis run keeps beside its store, named in this one place.

For a store `runs/fast.zarr`: `runs/fast.student.pt` (the proxy student a generator or memory-bank method
trained), `runs/fast.generator.pt` (a trained generator, which `generator=FILE` fills a store from),
`runs/fast.generator-train.pt` (generator training's checkpoint, for --resume) and `runs/fast.chain.pt`
(a memory-bank chain's state; `fast.chain-R-of-W.pt` per rank under torchrun).
"""

from __future__ import annotations

import os

SUFFIXES = {"student": ".student.pt", "generator": ".generator.pt", "generator-train": ".generator-train.pt",
            "chain": ".chain.pt"}


def side_prefix(store_path: str) -> str:
    """The store path without its extension: every side file's stem."""
    return os.path.splitext(os.fspath(store_path).rstrip("/"))[0]


def side_file(store_path: str, kind: str, rank: int = 0, world: int = 1) -> str:
    """The path of a store's side file of `kind` (a key of SUFFIXES); a chain's is per rank when world > 1."""
    if kind == "chain" and world > 1:
        return f"{side_prefix(store_path)}.chain-{rank}-of-{world}.pt"
    return side_prefix(store_path) + SUFFIXES[kind]
