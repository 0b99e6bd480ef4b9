"""`dfkd distill`: train one or many students at once from a store (or, with --kd-data, classical KD)."""

from __future__ import annotations

import os
from typing import Any

import click

from ...store.runtime import AMP_MODES

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
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Train on this many images of the store(s): whole units drawn with --seed, an equal share of each "
                   "store (to compare a mixture with one store at an equal image count).")
@click.option("--kd-data", default=None, help="Classical KD on this real dataset instead of a store (needs --teacher).")
@click.option("--student", "students", multiple=True, required=True,
              help="Student model, repeat for several: a zoo name (" + ", ".join(zoo_names()) + "), torchvision:NAME, "
                   "timm:NAME or package.module:factory.")
@click.option("--teacher", default=None, help="Teacher checkpoint: online targets for augmented views, or for --kd-data.")
@click.option("--eval", "eval_data", default=None, help="Real dataset whose test split scores the students: " + DATA_HELP)
@data_root_option
@click.option("--epochs", type=click.IntRange(min=1), default=300, show_default=True,
              help="Passes over the store. A store of a few thousand synthetic images wants hundreds: on "
                   "Fashion-MNIST a DeepInversion student gave 69.8% at 60 epochs, 77.1% at 300 (BENCHMARKS.md); "
                   "the view-label figures are at 367.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per step (per rank).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True,
              help="sgd (momentum 0.9, cosine) by default: on Fashion-MNIST view stores it beat Adam 1e-3 at T 4 by "
                   "6.5 points (82.07 vs 75.60%, BENCHMARKS.md).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate (cosine to 0); default 0.02 SGD, 1e-3 Adam.")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True, help="L2 weight decay of every student.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="KD temperature T (loss x T^2); 20 as in the Fast/CMI proxy students.")
@click.option("--kd", "kd_weight", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Weight of the KL term.")
@click.option("--ce-teacher", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Weight of CE to the teacher's argmax.")
@click.option("--augment", type=click.Choice(["none", "crop", "flip-crop"]), default="none", show_default=True,
              help="Label-preserving augmentation; stored logits are reused unless --teacher relabels the views.")
@click.option("--views/--no-views", default=True, show_default=True,
              help="On a store with view labels (synth --views, store label) and no --teacher: each epoch trains on "
                   "one stored augmented view per image with the teacher's stored logits of it.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader workers reading the store.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the students' initialization and the data order.")
@device_option
@click.option("--out", required=True, help="Run folder: a checkpoint per student, run.pt (resume), metrics.json.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--amp", type=click.Choice(AMP_MODES), default="auto", show_default=True,
              help="Mixed precision on CUDA (auto: bf16 where supported, else fp16 + grad scaler); off on CPU.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the students (CUDA; slow first steps).")
@model_code_option
@quiet_option
def distill_cmd(store_path: tuple[str, ...], max_images: int | None, kd_data: str | None, students: tuple[str, ...], teacher: str | None,
                eval_data: str | None, data_root: str | None, epochs: int, batch_size: int, optimizer: str,
                lr: float | None, weight_decay: float, temperature: float, kd_weight: float, ce_teacher: float,
                augment: str, views: bool, workers: int, seed: int, device: str, out: str, resume: bool, amp: str,
                compile_: bool, model_code: tuple[str, ...]) -> None:
    """Train one or more students at once from a store (or, with --kd-data, from real data and a teacher)."""
    if bool(store_path) == (kd_data is not None):
        raise click.UsageError("give exactly one of --store (data-free) or --kd-data (classical KD on real data)")
    if kd_weight == 0 and ce_teacher == 0:
        raise click.UsageError("--kd and --ce-teacher are both 0: the students would have nothing to learn; keep "
                               "--kd 1 (the default) or give --ce-teacher a weight")
    from ...distill.models import check_model_name

    from ..distributed import distributed

    for name in students:
        check_model_name(name)  # unknown names fail here, before any data is loaded
    with distributed(resolve_device(device)) as rank_device:  # under torchrun: DDP per student, equal batches per rank
        _distill(list(store_path), kd_data, students, teacher, eval_data, data_root, epochs, batch_size, optimizer,
                 lr, weight_decay, temperature, kd_weight, ce_teacher, augment, workers, seed, rank_device, out, resume,
                 amp, compile_, model_code, max_images, views)


def _distill(store_path: list[str], kd_data: str | None, students: tuple[str, ...], teacher: str | None,
             eval_data: str | None, data_root: str | None, epochs: int, batch_size: int, optimizer: str,
             lr: float | None, weight_decay: float, temperature: float, kd_weight: float, ce_teacher: float,
             augment: str, workers: int, seed: int, device: str, out: str, resume: bool, amp: str = "auto",
             compile_: bool = False, model_code: tuple[str, ...] = (), max_images: int | None = None,
             views: bool = True) -> None:
    from ...distill.checkpoint import load_model
    from ...distill.evaluate import accuracy
    from ...distill.sources import StoreSource, TensorSource

    from ..jobs import DistillJob, distill_trainer
    from ..real_data import load_data

    t_model, t_spec = None, None
    if teacher is not None:
        t_model, t_spec, _ = load_model(teacher, "teacher", model_code)
    job = DistillJob(store_path, list(students), out, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                     lr=lr, weight_decay=weight_decay, temperature=temperature, kd=kd_weight, ce_teacher=ce_teacher,
                     augment=augment, seed=seed, workers=workers, device=device, resume=resume, amp=amp,
                     compile=compile_, eval_every=1, max_images=max_images, views=views)
    if kd_data is not None:
        if t_model is None:
            raise click.UsageError("--kd-data needs --teacher (the teacher labels the real images online)")
        real = load_data(kd_data, data_root)
        _check_teacher(t_spec, real.num_classes, real.image_shape, kd_data)
        source: Any = TensorSource(real.train_images, real.train_labels, real.num_classes, t_spec.mean, t_spec.std,
                                   batch_size, seed, name=f"kd:{real.name}")
    else:
        source = StoreSource(store_path, batch_size, seed=seed, workers=workers, max_images=max_images,
                             views=views and t_model is None)
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
        evaluation = (ev.test_images, ev.test_labels)
    if resume and not os.path.exists(os.path.join(out, "run.pt")):
        click.echo(f"nothing to resume in {out}: starting")
    elif not resume and os.path.exists(os.path.join(out, "run.pt")):
        raise click.UsageError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    trainer = distill_trainer(job, evaluation, t_model, source)
    if trainer.start_epoch and trainer.rank == 0:
        click.echo(f"resuming {out} at epoch {trainer.start_epoch + 1}/{epochs}")
    metrics = trainer.fit()
    if trainer.rank != 0:
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
    for name in trainer.at_chance():
        click.echo(f"warning: student {name} ended agreeing with its targets at chance: it learned nothing; lower --lr, "
                   "or try --optimizer adam --temperature 4", err=True)
    click.echo(f"metrics: {os.path.join(out, 'metrics.json')}")
