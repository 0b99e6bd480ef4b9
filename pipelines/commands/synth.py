"""`dfkd synth` and `dfkd methods`: fill a store with a method's images; list each method's hyper-parameters."""

from __future__ import annotations

from typing import Any

import click

from ..settings import SynthSettings, click_options
from .options import (device_option, method_names, model_code_option, parse_sets, quiet_option, resolve_device,
                      zoo_names)


@click.command("synth")
@click.option("--teacher", required=True, help="Teacher checkpoint (from dfkd train-teacher or save_model).")
@click.option("--method", type=click.Choice(method_names()), required=True,
              help="Synthesis method; `dfkd methods` lists each one's --set keys with defaults.")
@click.option("--num-images", type=click.IntRange(min=1), required=True, help="Images in the store.")
@click.option("--out", required=True, help="Store path (*.zarr, or *.wds for WebDataset).")
@click.option("--stats", default=None, help="Record from dfkd record: statistics/spectra of chosen layers (stat, spectral, and the "
                                         "BN-free teacher's statistics for fast/nayer; adversarial/dafl with --set w_stat=W).")
@click.option("--student", default=None,
              help="adi: the competing student's checkpoint. adversarial/dafl/fast/nayer: the proxy student, a zoo "
                   "name or a checkpoint to start from; it is saved as <store stem>.student.pt. Zoo: "
                   + ", ".join(zoo_names()) + ".")
@click.option("--bank", multiple=True, help="fast/nayer: start the memory bank from this store of the same teacher "
              "(repeatable); with --student a trained student's checkpoint, the chain tops up what that student has "
              "not learned (distill the union with --store OLD --store NEW).")
@click.option("--generator", default=None, help="adversarial/dafl: fill the store from this saved generator "
                                                 "(<stem>.generator.pt) instead of training one.")
@click.option("--rounds", type=click.IntRange(min=0), default=None, help="adversarial/dafl: generator training rounds (the budget).")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Optimization steps per batch (inversion methods).")
@click.option("--set", "sets", multiple=True, help="Any method hyper-parameter, KEY=VALUE (e.g. w_bn=1); repeatable.")
@click_options(SynthSettings)
@click.option("--resume", is_flag=True, help="Finish an interrupted run (exactly the missing units).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@device_option
@model_code_option
@quiet_option
def synth_cmd(teacher: str, method: str, num_images: int, out: str, stats: str | None, student: str | None,
              bank: tuple[str, ...], generator: str | None, rounds: int | None, iterations: int | None,
              sets: tuple[str, ...], resume: bool, overwrite: bool, device: str, model_code: tuple[str, ...],
              **recipe: Any) -> None:
    """Fill a store with a method's images of the teacher, and the teacher's logits of those images.

    Generator methods (adversarial, dafl) first train a generator and a proxy student (checkpointed beside
    the store, continued by --resume), then fill the store by sampling the generator. Memory-bank methods
    (fast, nayer) make the store as a chain of batches, the proxy student learning from the units already
    written; the chain is checkpointed at unit boundaries (<stem>.chain.pt), so --resume continues it exactly.
    """
    from ...store.toolbox.compute import rank_and_world
    from ...synth.methods import method_config

    from ..distributed import distributed
    from ..jobs import SynthJob, run_synth

    hparams = parse_sets(sets)
    for key, value in (("iterations", iterations), ("rounds", rounds), ("generator", generator)):
        if value is not None:
            hparams[key] = value
    method_config(method, hparams)  # unknown keys fail before any loading
    with distributed(resolve_device(device)) as rank_device:  # under torchrun every rank takes its share of the write units
        res = run_synth(SynthJob(method, num_images, out, hparams, student, stats, resume, overwrite, rank_device,
                                 model_code=model_code, bank=bank, **recipe), teacher)
        if rank_and_world()[0] != 0:
            return
    views = recipe["views"]
    click.echo(f"wrote {out}: {num_images} images by {method} ({res['units']} units of {recipe['batch_size']})"
               + (f" with {views} view labels each" if views else "") + f" in {res['seconds']:.0f} s")
    if "generator" in res:
        click.echo(f"generator: {res['generator']}; proxy student ({res['student_arch']}): {res['student']}")
    elif "student" in res:
        click.echo(f"proxy student ({res['student_arch']}): {res['student']}")


@click.command("methods")
@click.argument("method", required=False, type=click.Choice(method_names()))
def methods_cmd(method: str | None) -> None:
    """List the synthesis methods, or METHOD's hyper-parameters (the keys of --set) with defaults and meanings."""
    from ..method_params import describe_method, describe_methods

    click.echo(describe_method(method) if method else describe_methods())
