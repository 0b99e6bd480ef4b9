"""dfkd's persistent synthetic dataset: one schema (images, teacher logits, labels, done flags,
provenance) over two backends (Zarr v3, WebDataset tar shards), a crash-safe writer and a streaming reader.
The storage layer knows nothing about models."""

from .api import create, create_or_resume, open, open_writer, plan_key
from .errors import DfkdError, StoreError
from .reader import StoreReader
from .schema import SCHEMA_VERSION, Records, StoreMeta
from .units import unit_seed
from .writer import StoreWriter

__all__ = [
    "SCHEMA_VERSION", "DfkdError", "Records", "StoreError", "StoreMeta", "StoreReader", "StoreWriter",
    "create", "create_or_resume", "open", "open_writer", "plan_key", "unit_seed",
]

from .loader import Batch, StoreDataset  # noqa: E402  (imports torch; kept last so the rest stays numpy-only)

__all__ += ["Batch", "StoreDataset"]
