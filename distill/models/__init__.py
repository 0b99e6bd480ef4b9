"""The model zoo: teachers and students by name, one file per family."""

from . import lenet, mlp, resnet, wrn  # noqa: F401  (each registers its models)
from .registry import (ModelError, check_file_model, check_model_name, create_model, is_code_name, list_models,
                       register_model)

__all__ = ["ModelError", "check_file_model", "check_model_name", "create_model", "is_code_name", "list_models",
           "register_model"]
