"""`dfkd synth` and `dfkd record`: the commands of the synthesis stage."""

from __future__ import annotations

from typing import Any

import click
import torch

from dfkd.distill.checkpoint import load_model
from dfkd.store.runtime import AMP_MODES, rank_and_world
from dfkd.synth.methods import list_methods, method_config

from .data import load_data
from .distributed import distributed
from .jobs import SynthJob, make_record, run_synth
from .options import model_code_option

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _parse_sets(pairs: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--set takes KEY=VALUE, got {p!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


@click.command("synth")
@click.option("--teacher", required=True, help="Teacher checkpoint (from dfkd train-teacher or save_model).")
@click.option("--method", type=click.Choice(list_methods()), required=True, help="Synthesis method.")
@click.option("--num-images", type=click.IntRange(min=1), required=True, help="Images in the store.")
@click.option("--out", required=True, help="Store path (*.zarr, or *.wds for WebDataset).")
@click.option("--stats", default=None, help="Record from dfkd record: statistics/spectra of chosen layers (stat, spectral, and the "
                                         "BN-free teacher's statistics for fast/nayer; adversarial/dafl with --set w_stat=W).")
@click.option("--student", default=None,
              help="adi: the competing student's checkpoint. adversarial/dafl/fast/nayer: the proxy student, a zoo "
                   "name (e.g. lenet5_half) or a checkpoint to start from; it is saved as <store stem>.student.pt.")
@click.option("--generator", default=None, help="adversarial/dafl: fill the store from this saved generator "
                                                 "(<stem>.generator.pt) instead of training one.")
@click.option("--rounds", type=click.IntRange(min=0), default=None, help="adversarial/dafl: generator training rounds (the budget).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per batch = per write unit.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Optimization steps per batch (inversion methods).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "sets", multiple=True, help="Any method hyper-parameter, KEY=VALUE (e.g. w_bn=1); repeatable.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run (exactly the missing units).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("--device", default=DEVICE, show_default=True)
@click.option("--amp", type=click.Choice(AMP_MODES), default="auto", show_default=True,
              help="Mixed precision on CUDA (auto: bf16 where supported, else fp16); always off on CPU.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the teacher (CUDA; slow first batch).")
@model_code_option
def synth_cmd(teacher: str, method: str, num_images: int, out: str, stats: str | None, student: str | None,
              generator: str | None, rounds: int | None, batch_size: int, iterations: int | None, seed: int,
              sets: tuple[str, ...], resume: bool, overwrite: bool, device: str, amp: str, compile_: bool,
              model_code: tuple[str, ...]) -> None:
    """Fill a store with a method's images of the teacher, and the teacher's logits of those images.

    Generator methods (adversarial, dafl) first train a generator and a proxy student (checkpointed beside
    the store, continued by --resume), then fill the store by sampling the generator. Memory-bank methods
    (fast, nayer) make the store as a chain of batches, the proxy student learning from the units already
    written; the chain is checkpointed at unit boundaries (<stem>.chain.pt), so --resume continues it exactly.
    """
    hparams = _parse_sets(sets)
    for key, value in (("iterations", iterations), ("rounds", rounds), ("generator", generator)):
        if value is not None:
            hparams[key] = value
    method_config(method, hparams)  # unknown keys fail before any loading
    with distributed(device) as rank_device:  # under torchrun every rank takes its share of the write units
        res = run_synth(SynthJob(method, num_images, out, hparams, batch_size, seed, student, stats, resume,
                                 overwrite, rank_device, amp=amp, compile=compile_, model_code=model_code), teacher)
        if rank_and_world()[0] != 0:
            return
    click.echo(f"wrote {out}: {num_images} images by {method} ({res['units']} units of {batch_size}) "
               f"in {res['seconds']:.0f} s")
    if "generator" in res:
        click.echo(f"generator: {res['generator']}; proxy student ({res['student_arch']}): {res['student']}")
    elif "student" in res:
        click.echo(f"proxy student ({res['student_arch']}): {res['student']}")


@click.command("record")
@click.option("--teacher", required=True, help="Teacher checkpoint.")
@click.option("--data", required=True, help="Real data to record on (its training split).")
@click.option("--data-root", default=None, help="Where datasets live.")
@click.option("--layers", default=None, help="Comma-separated layer paths (default: every conv/linear but the last).")
@click.option("--per-class", is_flag=True, help="Also record a mean amplitude spectrum per class.")
@click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--device", default=DEVICE, show_default=True)
@click.option("--out", required=True, help="Record file (.safetensors).")
@model_code_option
def record_cmd(teacher: str, data: str, data_root: str | None, layers: str | None, per_class: bool, batch_size: int,
               device: str, out: str, model_code: tuple[str, ...]) -> None:
    """One pass of the teacher over real data: per-layer channel mean/variance and mean amplitude spectra."""
    model, spec, _ = load_model(teacher, "teacher", model_code)
    real = load_data(data, data_root)
    chosen = [l.strip() for l in layers.split(",")] if layers else None
    rec, size = make_record(model, spec, real, out, layers=chosen, per_class=per_class, batch_size=batch_size,
                            device=device)
    data_bytes = real.train_images.numel()
    click.echo(f"wrote {out}: {len(rec.layers)} layers ({', '.join(rec.layers)}), {rec.num_images} images; "
               f"{size / 1024:.1f} KiB = {100 * size / data_bytes:.2f}% of the {data_bytes / 2**20:.1f} MiB of images it summarizes")
