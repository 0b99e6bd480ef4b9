"""dfkd's persistent synthetic dataset: one schema (images, teacher logits, labels, done flags,
provenance) over two backends (Zarr v3, WebDataset tar shards), a crash-safe writer and a streaming reader.
The storage layer knows nothing about models. Names load on first use: importing `dfkd.store.toolbox.errors`
(every command does) costs neither zarr nor torch."""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_LAZY = {
    "create": "access", "create_or_resume": "access", "open": "access", "open_writer": "access", "plan_key": "schema",
    "DfkdError": "toolbox.errors", "StoreError": "toolbox.errors", "StoreReader": "reader", "SCHEMA_VERSION": "schema",
    "Samples": "schema", "StoreMeta": "schema", "unit_seed": "units", "StoreWriter": "writer",
    "Batch": "loader", "StoreDataset": "loader",  # these two import torch
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
