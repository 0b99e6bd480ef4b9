"""Synthesis methods, one file per family, registered by name."""

from . import adversarial, dafl, deepinversion, fast, nayer, noise, spectral  # noqa: F401  (each registers its methods)
from .base import (Method, MethodError, SynthContext, create_method, list_methods, method_class, method_config,
                   register_method)

__all__ = ["Method", "MethodError", "SynthContext", "create_method", "list_methods", "method_class", "method_config",
           "register_method"]
