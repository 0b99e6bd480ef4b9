"""One registry helper for every registry (models, methods, generators, store backends), filled by decorators.

`declared_names` lists what a package's decorators would register by reading its source, without importing
it: `--help` texts name the zoo and the methods without importing torch.
"""

from __future__ import annotations

import ast
import os
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, filled by `@registry.register`; unknown names raise `error` with the choices."""

    def __init__(self, kind: str, error: type[Exception], key: Callable[[T], str] = lambda obj: obj.__name__) -> None:
        self.kind, self.error, self.key = kind, error, key
        self._items: dict[str, T] = {}

    def register(self, obj: T) -> T:
        """Decorator: make `obj` available under its key (a function's name, a class's `name`)."""
        name = self.key(obj)
        if name in self._items and self._items[name] is not obj:
            raise self.error(f"two {self.kind}s are registered as {name!r}; rename one")
        self._items[name] = obj
        return obj

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The object registered as `name`, or one line naming the choices."""
        if name not in self._items:
            raise self.error(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._items[name]

    __getitem__ = get

    def values(self) -> list[T]:
        """The registered objects, in registration order (the order a search through them follows)."""
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items


def declared_names(package_dir: str, decorator: str) -> list[str]:
    """Names `@decorator` registers in the .py files of `package_dir`, read from the source (nothing imported).

    A decorated function registers its own name; a decorated class its `name = "..."` class attribute.
    """
    names = []
    for file in sorted(os.listdir(package_dir)):
        if not file.endswith(".py"):
            continue
        with open(os.path.join(package_dir, file), encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), filename=file)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            if not any(isinstance(d, ast.Name) and d.id == decorator or
                       isinstance(d, ast.Attribute) and d.attr == decorator for d in node.decorator_list):
                continue
            if isinstance(node, ast.FunctionDef):
                names.append(node.name)
                continue
            for item in node.body:
                target = item.target if isinstance(item, ast.AnnAssign) else (
                    item.targets[0] if isinstance(item, ast.Assign) and len(item.targets) == 1 else None)
                if isinstance(target, ast.Name) and target.id == "name" and isinstance(item.value, ast.Constant):
                    names.append(str(item.value.value))
    return sorted(names)
