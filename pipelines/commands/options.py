"""Click options and small helpers that several commands share, defined once. Nothing here imports torch."""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import click

from ...store.toolbox.registry import declared_names

model_code_option: Callable[[Any], Any] = click.option(
    "--model-code", "model_code", multiple=True, metavar="PACKAGE.MODULE:FACTORY",
    help="Trust this model factory when a checkpoint names it (repeatable). Without it dfkd builds only zoo, "
         "torchvision: and timm: architectures from a file: a file never makes dfkd import code.")

device_option: Callable[[Any], Any] = click.option(
    "--device", default="auto", show_default=True,
    help="cpu, cuda, cuda:N, or auto (cuda when a GPU is visible, else cpu).")


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        from ...store.toolbox.progress import set_quiet

        set_quiet()
    return value


quiet_option: Callable[[Any], Any] = click.option(
    "--quiet", "-q", is_flag=True, expose_value=False, is_eager=True, callback=_quiet,
    help="No progress bars or progress log lines (errors and the final summary still print).")


def resolve_device(device: str) -> str:
    """The device a command runs on: `auto` becomes cuda when torch sees a GPU, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package, __package__)  # imports only the parents (their __init__ files are light)
    assert spec is not None and spec.submodule_search_locations, package
    return list(spec.submodule_search_locations)[0]


def zoo_names() -> list[str]:
    """The model zoo's names, read from its source: listing them for --help must not import torch."""
    return declared_names(_package_dir("...distill.models"), "register_model")


def method_names() -> list[str]:
    """The synthesis methods' names, read from their source (as zoo_names)."""
    return declared_names(_package_dir("...synth.methods"), "register_method")


def parse_sets(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs as a dict (values stay strings; the method's config types them)."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--set takes KEY=VALUE, got {p!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def data_root_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--data-root", default=None,
                        help="Where datasets live (default $DFKD_DATA or ~/.cache/dfkd/data).")(fn)


DATA_HELP = "digits, fashion-mnist, mnist, cifar10, cifar100, or an ImageFolder path."
