"""`dfkd distill`: train one or many students at once from a store (or, with --kd-data, classical KD)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import click

from ..settings import DistillSettings, click_options
from .options import (DATA_HELP, data_root_option, device_option, model_code_option, pct, quiet_option,
                      resolve_device, table, zoo_names)


def _check_teacher(spec: Any, num_classes: int, shape: tuple[int, ...], what: str) -> None:
    """Refuse a teacher (a ModelSpec) whose classes or input shape differ from the data's."""
    from ...distill.trainer import TrainError

    if spec.num_classes != num_classes:
        raise TrainError(f"the teacher has {spec.num_classes} classes but {what} has {num_classes}; "
                         "use the teacher that made the store / was trained on the data")
    if tuple(spec.image_shape) != tuple(shape):
        raise TrainError(f"the teacher takes {tuple(spec.image_shape)} images but {what} holds {tuple(shape)}")


@click.command("distill")
@click.option("--store", "store_path", multiple=True, help="Synthetic store to distill from (no teacher needed); repeat "
              "to train on the union of several stores of one teacher, shuffled as one.")
@click.option("--kd-data", default=None, help="Classical KD on this real dataset instead of a store (needs --teacher).")
@click.option("--student", "students", multiple=True, required=True,
              help="Student model, repeat for several: a zoo name (" + ", ".join(zoo_names()) + "), torchvision:NAME, "
                   "timm:NAME or package.module:factory.")
@click.option("--eval", "eval_data", default=None, help="Real dataset whose test split scores the students: " + DATA_HELP)
@click.option("--eval-every", type=click.IntRange(min=0), default=10, show_default=True,
              help="Epochs between scorings with --eval (each scores the whole test split, shown in the progress "
                   "line and metrics.json; the last epoch is always scored); 1: every epoch, 0: the last only. "
                   "Training is the same either way; scoring Fashion-MNIST's 10k test images every epoch took 63% "
                   "of a 367-epoch run on 6,144 images.")
@data_root_option
@click_options(DistillSettings)
@device_option
@click.option("--out", required=True, help="Run folder: a checkpoint per student, run.pt (resume), metrics.json.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@model_code_option
@quiet_option
def distill_cmd(store_path: tuple[str, ...], kd_data: str | None, students: tuple[str, ...], eval_data: str | None,
                eval_every: int, data_root: str | None, device: str, out: str, resume: bool, model_code: tuple[str, ...],
                **recipe: Any) -> None:
    """Train one or more students at once from a store (or, with --kd-data, from real data and a teacher)."""
    if bool(store_path) == (kd_data is not None):
        raise click.UsageError("give exactly one of --store (data-free) or --kd-data (classical KD on real data)")
    settings = DistillSettings(**recipe)  # the checks every front end shares (kd and ce_teacher both 0, ...)
    from ...distill.models import check_model_name

    from ..distributed import distributed

    for name in students:
        check_model_name(name)  # unknown names fail here, before any data is loaded
    with distributed(resolve_device(device)) as rank_device:  # under torchrun: DDP per student, equal batches per rank
        _distill(list(store_path), kd_data, students, eval_data, eval_every, data_root, rank_device, out, resume,
                 model_code, settings)


def _distill(store_path: list[str], kd_data: str | None, students: tuple[str, ...], eval_data: str | None,
             eval_every: int, data_root: str | None, device: str, out: str, resume: bool, model_code: tuple[str, ...],
             recipe: DistillSettings) -> None:
    from ...distill.checkpoint import load_model
    from ...distill.evaluate import accuracy
    from ...distill.sources import StoreSource, TensorSource

    from ..jobs import DistillJob, at_chance_warning, run_distill
    from ..real_data import load_data

    t_model, t_spec = None, None
    if recipe.teacher is not None:
        t_model, t_spec, _ = load_model(recipe.teacher, "teacher", model_code)
    job = DistillJob(store_path, list(students), out, device=device, resume=resume, eval_every=eval_every,
                     model_code=model_code, **dataclasses.asdict(recipe))
    batch_size, seed, epochs, augment = recipe.batch_size, recipe.seed, recipe.epochs, recipe.augment
    if kd_data is not None:
        if t_model is None:
            raise click.UsageError("--kd-data needs --teacher (the teacher labels the real images online)")
        if recipe.max_images is not None:
            raise click.UsageError("--max-images takes whole units of a store; --kd-data trains on the whole training "
                                   "split (for fewer real images, a pipeline's [[synth]] with method = \"real\" and "
                                   "num_images makes a store)")
        real = load_data(kd_data, data_root)
        _check_teacher(t_spec, real.num_classes, real.image_shape, kd_data)
        source: Any = TensorSource(real.train_images, real.train_labels, real.num_classes, t_spec.mean, t_spec.std,
                                   batch_size, seed, name=f"kd:{real.name}")
    else:
        source = StoreSource(store_path, batch_size, seed=seed, workers=recipe.workers, max_images=recipe.max_images,
                             views=recipe.views and t_model is None)
        if t_spec is not None:
            _check_teacher(t_spec, source.num_classes, source.image_shape, " + ".join(store_path))
        if source.views:
            m = source.dataset.meta
            click.echo(f"training on the store's view labels: each epoch one of {m.views} stored {m.view_recipe['mode']} "
                       "views per image with the teacher's logits of it (no teacher needed)"
                       + (f"; --augment {augment} is not applied on top" if augment != "none" else ""))
    evaluation = None
    if eval_data is not None:
        ev = load_data(eval_data, data_root)
        if ev.num_classes != source.num_classes:  # labels of other classes would score 0% without a word
            raise click.UsageError(f"--eval {eval_data} has {ev.num_classes} classes but the students learn "
                                   f"{source.num_classes}; evaluate on the teacher's own dataset")
        evaluation = (ev.test_images, ev.test_labels)
    if resume and not os.path.exists(os.path.join(out, "run.pt")):
        click.echo(f"nothing to resume in {out}: starting")
    elif not resume and os.path.exists(os.path.join(out, "run.pt")):
        raise click.UsageError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    def say_resumed(trainer: Any) -> None:
        if trainer.start_epoch and trainer.rank == 0:
            click.echo(f"resuming {out} at epoch {trainer.start_epoch + 1}/{epochs}")

    metrics = run_distill(job, evaluation, t_model, source, on_start=say_resumed)  # the job `dfkd run` runs too
    if metrics["rank"] != 0:
        return
    rows = []
    if t_model is not None and evaluation is not None:
        rows.append(("teacher", t_spec.arch, f"{sum(p.numel() for p in t_model.parameters()):,}",
                     pct(accuracy(t_model, *evaluation, t_spec.mean, t_spec.std, device=device)), "-"))
    for name, m in metrics["students"].items():
        rows.append((name, m["arch"], f"{m['parameters']:,}", pct(m["final"].get("test_top1")),
                     f"{sum(r['seconds'] for r in m['history']):.1f}"))
    click.echo(f"distilled from {source.name}, {epochs} epochs, {metrics['batches_read']} batches read "
               f"(each fed to {len(students)} student(s))")
    click.echo(table(rows, ("model", "arch", "parameters", "test top-1 (last epoch)", "train s")))
    for name in metrics["at_chance"]:
        click.echo(at_chance_warning(name, "--optimizer adam --temperature 4"), err=True)
    click.echo(f"metrics: {os.path.join(out, 'metrics.json')}")
