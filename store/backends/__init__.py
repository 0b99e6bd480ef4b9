"""Storage backends: each maps the one logical store format onto a physical layout."""

from .base import Backend, backend_for_new, backend_for_existing, get_backend, list_backends, register_backend
from . import webdataset as _webdataset  # noqa: F401  (registers "webdataset")
from . import zarr as _zarr  # noqa: F401  (registers "zarr")

__all__ = ["Backend", "backend_for_new", "backend_for_existing", "get_backend", "list_backends", "register_backend"]
