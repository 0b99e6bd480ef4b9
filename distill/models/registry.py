"""One entry point per concept: `create_model(name, ...)`, filled by the @register_model decorator."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Collection

from torch import nn

from ...store.toolbox.errors import DfkdError
from ...store.toolbox.registry import Registry


class ModelError(DfkdError):
    """An unknown model name, a factory that cannot be imported, or arguments a model cannot take."""


_MODELS: Registry[Callable[..., nn.Module]] = Registry("model", ModelError)
register_model = _MODELS.register  # a factory under its function name; it takes num_classes, in_channels, image_size


def list_models() -> list[str]:
    """Names of the zoo's models (torchvision:NAME, timm:NAME and package.module:factory also work)."""
    return _MODELS.names()


SAFE_PREFIXES = ("torchvision:", "timm:")
# Arguments that make torchvision or timm fetch or read weights: a file may never set them.
LOADER_KWARGS = frozenset({"weights", "weights_backbone", "progress", "pretrained", "pretrained_cfg",
                           "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"})
SCALARS = (bool, int, float, str, type(None))


def is_code_name(name: str) -> bool:
    """Whether `name` is a `package.module:factory` (building it imports code), not a zoo/torchvision/timm name."""
    return name not in _MODELS and ":" in name and not name.startswith(SAFE_PREFIXES)


def check_file_model(name: Any, kwargs: Any, where: str, model_code: Collection[str] = ()) -> None:
    """Refuse what a file may not choose: a code factory the user did not name, or non-scalar/undeclared kwargs.

    A file (checkpoint, generator, record) names its architecture; dfkd builds it only from the zoo,
    torchvision or timm, unless the user named that same `package.module:factory` (`--model-code`).
    """
    if not isinstance(name, str) or not name:
        raise ModelError(f"{where} names no architecture; it is corrupt or not a dfkd file")
    if is_code_name(name) and name not in model_code:
        raise ModelError(f"{where} names the model factory {name!r}; dfkd never imports code a file names. "
                         f"If you trust it, pass --model-code {name}")
    if not is_code_name(name):
        check_model_name(name)
    if not isinstance(kwargs, dict):
        raise ModelError(f"{where}: model arguments must be a mapping, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if not isinstance(value, SCALARS) and not (isinstance(value, (list, tuple)) and all(isinstance(v, SCALARS) for v in value)):
            raise ModelError(f"{where}: model argument {key!r} is a {type(value).__name__}; a file may only give "
                             "plain numbers, strings, booleans or lists of them")
        if key in LOADER_KWARGS:
            raise ModelError(f"{where}: model argument {key!r} would load weights from elsewhere; a file may not set it")
    if name in _MODELS:
        params = inspect.signature(_MODELS[name]).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            bad = sorted(set(kwargs) - set(params) | set(kwargs) & {"num_classes", "in_channels", "image_size"})
            if bad:
                raise ModelError(f"{where}: {name} takes no argument {bad[0]!r}; the file is corrupt or from another dfkd")


def check_model_name(name: str) -> None:
    """Refuse an unknown zoo name up front (prefixed names are checked when built)."""
    if name not in _MODELS and not name.startswith(("torchvision:", "timm:")) and ":" not in name:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(list_models())}, "
                         "or torchvision:NAME, timm:NAME, package.module:factory")


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs: Any) -> nn.Module:
    """Build a model by zoo name, `torchvision:NAME`, `timm:NAME` or `package.module:factory`."""
    if name in _MODELS:
        return _MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    if name.startswith("torchvision:"):
        return _torchvision(name.split(":", 1)[1], num_classes, in_channels, **kwargs)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ModelError(f"{name} needs timm, which is not installed; pip install timm") from None
        return timm.create_model(name.split(":", 1)[1], pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels, **kwargs)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"cannot import model factory {name!r} ({exc}); give package.module:function "
                             "importable from here") from None
        try:
            model = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
        except TypeError as exc:  # a factory of another signature (os:getcwd, say)
            raise ModelError(f"model factory {name!r} cannot be called as {attr}(num_classes=, in_channels=, "
                             f"image_size=) ({exc}); give a function with those keyword arguments") from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"model factory {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    check_model_name(name)
    raise AssertionError("unreachable: check_model_name refuses every other name")


def _torchvision(arch: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except ValueError:
        raise ModelError(f"torchvision has no model {arch!r}; see torchvision.models.list_models()") from None
    if in_channels != 3:
        raise ModelError(f"torchvision:{arch} takes 3 input channels, the data has {in_channels}; "
                         "use a zoo model, which takes any channel count")
    return model
