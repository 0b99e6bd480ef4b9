"""Click options that several commands share, defined once."""

from __future__ import annotations

from typing import Any, Callable

import click

model_code_option: Callable[[Any], Any] = click.option(
    "--model-code", "model_code", multiple=True, metavar="PACKAGE.MODULE:FACTORY",
    help="Trust this model factory when a checkpoint names it (repeatable). Without it dfkd builds only zoo, "
         "torchvision: and timm: architectures from a file: a file never makes dfkd import code.")
