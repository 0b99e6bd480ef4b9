"""`dfkd record`: the statistics of a teacher on its real data that a data owner can release with it."""

from __future__ import annotations

import click

from .options import DATA_HELP, data_root_option, device_option, model_code_option, resolve_device


@click.command("record")
@click.option("--teacher", required=True, help="Teacher checkpoint.")
@click.option("--data", required=True, help="Real data to record on (its training split): " + DATA_HELP)
@data_root_option
@click.option("--layers", default=None, help="Comma-separated layer paths (default: every conv/linear but the last).")
@click.option("--per-class", is_flag=True, help="Also record a mean amplitude spectrum per class.")
@click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True,
              help="Images per teacher forward pass (memory only; the record does not depend on it).")
@device_option
@click.option("--out", required=True, help="Record file (.safetensors).")
@model_code_option
def record_cmd(teacher: str, data: str, data_root: str | None, layers: str | None, per_class: bool, batch_size: int,
               device: str, out: str, model_code: tuple[str, ...]) -> None:
    """One pass of the teacher over real data: per-layer channel mean/variance and mean amplitude spectra."""
    from ...distill.checkpoint import load_model

    from ..jobs import make_record
    from ..real_data import load_data

    model, spec, _ = load_model(teacher, "teacher", model_code)
    real = load_data(data, data_root)
    chosen = [l.strip() for l in layers.split(",")] if layers else None
    rec, size = make_record(model, spec, real, out, layers=chosen, per_class=per_class, batch_size=batch_size,
                            device=resolve_device(device))
    data_bytes = real.train_images.numel()
    click.echo(f"wrote {out}: {len(rec.layers)} layers ({', '.join(rec.layers)}), {rec.num_images} images; "
               f"{size / 1024:.1f} KiB = {100 * size / data_bytes:.2f}% of the {data_bytes / 2**20:.1f} MiB of images it summarizes")
