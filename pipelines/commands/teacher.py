"""`dfkd train-teacher`: a teacher trained with plain supervised learning on real data."""

from __future__ import annotations

from typing import Any

import click

from ..settings import TeacherSettings, click_options
from .options import DATA_HELP, data_root_option, device_option, pct, quiet_option, resolve_device, zoo_names


@click.command("train-teacher")
@click.option("--model", "arch", required=True, help="A zoo name (" + ", ".join(zoo_names()) + "), torchvision:NAME, "
                                                   "timm:NAME or package.module:factory.")
@click.option("--data", required=True, help=DATA_HELP)
@data_root_option
@click_options(TeacherSettings)
@device_option
@click.option("--out", required=True, help="Checkpoint to write (architecture, normalization, weights, accuracy).")
@quiet_option
def train_teacher(arch: str, data: str, data_root: str | None, device: str, out: str, **settings: Any) -> None:
    """Train a teacher with plain supervised learning and report its test top-1."""
    from ..jobs import train_teacher as train_teacher_job
    from ..real_data import load_data

    real = load_data(data, data_root)
    res = train_teacher_job(arch, real, out, device=resolve_device(device), **settings)
    epochs = settings["epochs"]
    click.echo(f"teacher {arch} on {real.name}: test top-1 {pct(res['test_top1'])} after {epochs} epochs "
               f"({res['seconds']:.0f} s) -> {out}")
