"""dfkd: data-free knowledge distillation. A teacher -> a surrogate dataset in a chunked store -> students.

The stages are subpackages (`dfkd.store`, `dfkd.synth`, `dfkd.distill`, `dfkd.pipelines`); this module is the
small public API for Python users. Names load on first use, so `import dfkd` does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

try:
    __version__ = importlib.metadata.version("dfkd")  # the one version: the package metadata
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# public name -> (module, attribute): resolved lazily by __getattr__
_LAZY = {
    "open_store": ("dfkd.store", "open"),
    "StoreDataset": ("dfkd.store", "StoreDataset"),
    "StoreError": ("dfkd.store", "StoreError"),
    "DfkdError": ("dfkd.store", "DfkdError"),
    "load_model": ("dfkd.distill.checkpoint", "load_model"),
    "save_model": ("dfkd.distill.checkpoint", "save_model"),
    "ModelSpec": ("dfkd.distill.checkpoint", "ModelSpec"),
    "create_model": ("dfkd.distill.models", "create_model"),
    "list_models": ("dfkd.distill.models", "list_models"),
    "list_methods": ("dfkd.synth.methods", "list_methods"),
    "SynthJob": ("dfkd.pipelines.jobs", "SynthJob"),
    "DistillJob": ("dfkd.pipelines.jobs", "DistillJob"),
}

__all__ = ["__version__", "synthesize", "distill_students", *_LAZY]  # not `distill`: that is the subpackage


def synthesize(teacher: str, method: str, num_images: int, out: str, **options: Any) -> dict[str, Any]:
    """Fill a store at `out` with `num_images` made by `method` from the teacher checkpoint; options: SynthJob's."""
    from .pipelines.jobs import SynthJob, run_synth

    return run_synth(SynthJob(method=method, num_images=num_images, out=out, **options), teacher)


def distill_students(store: str | list[str], students: list[str], out: str, **options: Any) -> dict[str, Any]:
    """Train `students` (zoo names) from one store or the union of several; options: DistillJob's fields."""
    from .pipelines.jobs import DistillJob, run_distill

    return run_distill(DistillJob(store=store, students=list(students), out=out, **options))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'dfkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
