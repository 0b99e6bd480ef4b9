"""The model zoo: teachers and students by name, one file per family."""

from . import lenet, mlp, resnet, wrn  # noqa: F401  (each registers its models)
from .registry import ModelError, create_model, list_models, register_model

__all__ = ["ModelError", "create_model", "list_models", "register_model"]
