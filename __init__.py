"""dfkd: data-free knowledge distillation. A teacher -> a surrogate dataset in a chunked store -> students.

The stages are subpackages (`dfkd.store`, `dfkd.synth`, `dfkd.distill`, `dfkd.pipelines`); this module is the
small public API for Python users. Names load on first use, so `import dfkd` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .store.toolbox.version import __version__

if TYPE_CHECKING:  # what the lazy names below are, for readers and type checkers (nothing is imported at run time)
    from .distill.checkpoint import ModelSpec, load_model, save_model
    from .distill.models import create_model, list_models
    from .pipelines.jobs import DistillJob, SynthJob
    from .store import DfkdError, StoreDataset, StoreError
    from .store import open as open_store
    from .synth.methods import list_methods

# public name -> (module, attribute): resolved lazily by __getattr__
_LAZY = {
    "open_store": (".store", "open"),
    "StoreDataset": (".store", "StoreDataset"),
    "StoreError": (".store", "StoreError"),
    "DfkdError": (".store", "DfkdError"),
    "load_model": (".distill.checkpoint", "load_model"),
    "save_model": (".distill.checkpoint", "save_model"),
    "ModelSpec": (".distill.checkpoint", "ModelSpec"),
    "create_model": (".distill.models", "create_model"),
    "list_models": (".distill.models", "list_models"),
    "list_methods": (".synth.methods", "list_methods"),
    "SynthJob": (".pipelines.jobs", "SynthJob"),
    "DistillJob": (".pipelines.jobs", "DistillJob"),
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
        return getattr(importlib.import_module(module, __name__), attr)
    raise AttributeError(f"module 'dfkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
