"""The teacher's identity: a fingerprint that ties a store or a record to one set of weights."""

from __future__ import annotations

from torch import nn

from ..store.toolbox.identity import weights_fingerprint


def fingerprint(model: nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes): ties a store or record to one teacher."""
    return weights_fingerprint(model.state_dict())
