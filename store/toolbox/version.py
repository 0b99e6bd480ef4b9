"""The one dfkd version, from the package metadata: stamped into every store's provenance, shown by `dfkd --version`."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("dfkd")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
