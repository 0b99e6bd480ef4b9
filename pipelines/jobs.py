"""The work behind each command, as plain functions: the CLI commands and `dfkd run` both call these."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import store
from ..store.toolbox import fs
from ..distill.augment import normalize
from ..distill.checkpoint import ModelSpec, load_model, save_model
from ..distill.losses import Objective
from ..distill.models import check_model_name
from ..distill.sources import StoreSource, TensorSource
from ..distill.trainer import StudentSpec, TrainConfig, Trainer
from ..store.toolbox.errors import DfkdError
from ..store.toolbox.compute import rank_and_world
from ..synth.engine import SynthConfig, synthesize
from ..synth.teacher import fingerprint, teacher_labeller
from ..synth.methods import method_class
from ..synth.record import TeacherStats, record
from ..synth.side_files import side_file
from ..synth.view_labels import label_views, with_views

from .real_data import RealData
from .settings import DistillSettings, SynthSettings, TeacherSettings


class JobError(DfkdError):
    """A job whose inputs do not fit together (shapes, classes, missing pieces)."""


def train_teacher(arch: str, real: RealData, out: str, *, device: str = "cpu", run_dir: str | None = None,
                  resume: bool = False, progress: bool | None = None, **settings: Any) -> dict[str, Any]:
    """Supervised training on real data (`settings`: TeacherSettings' fields); writes the checkpoint with its test
    top-1; returns the figures."""
    check_model_name(arch)
    t = TeacherSettings(**settings)
    src = TensorSource(real.train_images, real.train_labels, real.num_classes, real.mean, real.std, t.batch_size,
                       t.seed, name=real.name)
    cfg = TrainConfig(epochs=t.epochs, seed=t.seed, augment=real.augment if t.augment == "auto" else t.augment,
                      objective=Objective(kd=0.0, ce_label=1.0), device=device, out_dir=run_dir, resume=resume,
                      progress=progress, label="train-teacher")
    trainer = Trainer(src, [StudentSpec(arch, t.optimizer, t.peak_lr, weight_decay=t.weight_decay)], cfg,
                      eval_data=(real.test_images, real.test_labels))
    trainer.fit()
    s = trainer.students[0]
    top1 = s.history[-1]["test_top1"]
    seconds = sum(r["seconds"] for r in s.history)
    save_model(out, s.model, s.spec, {"data": real.name, "test_top1": top1, "epochs": t.epochs, "history": s.history})
    return {"test_top1": top1, "seconds": seconds}


def make_record(teacher: nn.Module, spec: ModelSpec, real: RealData, out: str, *, layers: list[str] | None = None,
                per_class: bool = False, batch_size: int = 500, device: str = "cpu") -> tuple[TeacherStats, int]:
    """One pass of the teacher over the real training split; writes the record, returns it and its size."""
    if tuple(real.image_shape) != tuple(spec.image_shape):
        raise JobError(f"the teacher takes {spec.image_shape} images but {real.name} holds {real.image_shape}")
    teacher = teacher.to(device)
    x, y = real.train_images, real.train_labels
    batches = ((normalize(x[i:i + batch_size].to(device), spec.mean, spec.std), y[i:i + batch_size].to(device))
               for i in range(0, len(x), batch_size))
    rec = record(teacher, batches, layers, real.num_classes if per_class else 0, real.name)
    return rec, rec.save(out)


def build_student(student: str, teacher: ModelSpec, trainable: bool, seed: int = 0,
                  model_code: tuple[str, ...] = ()) -> tuple[nn.Module, ModelSpec]:
    """A student for synthesis: a checkpoint, or (for methods that train it) a fresh model the user named."""
    if os.path.isfile(student) or not trainable:
        model, spec, _ = load_model(student, "student", model_code)
    else:
        check_model_name(student)
        spec = ModelSpec(student, teacher.num_classes, teacher.in_channels, teacher.image_size, teacher.mean,
                         teacher.std)
        torch.manual_seed(seed)
        model = spec.build()
    if (spec.num_classes, spec.image_shape) != (teacher.num_classes, teacher.image_shape):
        raise JobError(f"the student {student} is for {spec.num_classes} classes of {spec.image_shape} images "
                       f"but the teacher has {teacher.num_classes} classes of {teacher.image_shape}")
    return model, spec


@dataclass
class SynthJob(SynthSettings):
    """One synthesis run: method, its options, the store it fills; the rest of the recipe is SynthSettings'
    (keyword arguments)."""

    method: str
    num_images: int
    out: str
    hparams: dict[str, Any] = field(default_factory=dict)
    student: str | None = None
    stats: str | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    progress: bool | None = None
    model_code: tuple[str, ...] = ()  # package.module:factory names the user trusts checkpoints to name
    bank: tuple[str, ...] = ()  # fast/nayer: existing stores of this teacher the memory bank starts from


def run_synth(job: SynthJob, teacher_path: str) -> dict[str, Any]:
    """Fill a store; for generator methods also save the proxy student beside it. Returns paths and seconds."""
    t0 = time.perf_counter()
    cls = method_class(job.method)
    generative = cls.trains_student
    model, spec, _ = load_model(teacher_path, "teacher", job.model_code)
    rec = TeacherStats.load(job.stats) if job.stats else None
    stu, stu_spec = (build_student(job.student, spec, generative, job.seed, job.model_code) if job.student
                     else (None, None))
    cfg = SynthConfig(num_images=job.num_images, out=job.out, batch_size=job.batch_size, seed=job.seed,
                      resume=job.resume, overwrite=job.overwrite, device=job.device, progress=job.progress,
                      amp=job.amp, compile=job.compile, cuda_graphs=job.cuda_graphs,
                      units_in_flight=job.units_in_flight, views=job.views,
                      view_mode=job.view_mode,
                      bank=tuple(job.bank))
    student_file = side_file(job.out, "student")

    def save_student(wrote: bool) -> None:  # with the generator it was trained beside, before the fill
        if wrote or not fs.exists(student_file):
            save_model(student_file, stu, stu_spec, {"trained_by": job.method, "store": job.out})

    writer = synthesize(model, job.method, cfg, image_shape=spec.image_shape, num_classes=spec.num_classes,
                        mean=spec.mean, std=spec.std, hparams=job.hparams, record=rec, student=stu,
                        teacher_spec={"path": os.path.abspath(teacher_path), "arch": spec.arch},
                        on_trained=save_student if generative and not job.hparams.get("generator") else None)
    out = {"store": job.out, "units": writer.meta.num_units}
    if generative and not job.hparams.get("generator") and rank_and_world()[0] == 0:
        out.update(student=student_file, student_arch=stu_spec.arch)
        if cls.saves_generator:
            out["generator"] = side_file(job.out, "generator")
    out["seconds"] = time.perf_counter() - t0
    return out


def fill_real_store(path: str, teacher_path: str, real: RealData, num_images: int, *, seed: int = 0,
                    unit_size: int = 256, device: str = "cpu", overwrite: bool = False,
                    model_code: tuple[str, ...] = (), views: int = 0, view_mode: str = "flip-crop") -> dict[str, Any]:
    """`num_images` real training images (a seeded draw) with the teacher's logits: real-data KD at equal count."""
    t0 = time.perf_counter()
    teacher, spec, _ = load_model(teacher_path, "teacher", model_code)
    if tuple(real.image_shape) != tuple(spec.image_shape) or real.num_classes != spec.num_classes:
        raise JobError(f"the teacher takes {spec.num_classes} classes of {spec.image_shape} images; {real.name} has "
                       f"{real.num_classes} of {real.image_shape}")
    if num_images > len(real.train_images):
        raise JobError(f"{real.name} has {len(real.train_images)} training images; num_images is {num_images}")
    teacher = teacher.to(device)
    idx = np.sort(np.random.default_rng(seed).choice(len(real.train_images), num_images, replace=False))
    x = real.train_images[idx]
    logits_of = teacher_labeller(teacher, spec.mean, spec.std, device)
    logits = logits_of(x)
    meta = store.StoreMeta(num_samples=num_images, image_shape=spec.image_shape, num_classes=spec.num_classes,
                           unit_size=unit_size, logits_dtype="float32", base_seed=seed, mean=spec.mean, std=spec.std,
                           provenance={"method": "real", "data": real.name, "teacher_fingerprint": fingerprint(teacher)})
    if views:
        meta = with_views(meta, views, view_mode)
    w = store.create(path, meta, overwrite=overwrite)
    for u in w.pending_units():
        lo, hi = w.unit_range(u)
        v = label_views(logits_of, x[lo:hi], meta, u) if views else None
        w.write_unit(u, x[lo:hi].numpy(), logits[lo:hi].numpy(), real.train_labels[idx[lo:hi]].numpy(), v)
    w.finalize()
    return {"store": path, "units": w.meta.num_units, "seconds": time.perf_counter() - t0}


@dataclass
class DistillJob(DistillSettings):
    """Students trained together from one store (or the union of several), evaluated on a real test split; the
    recipe is DistillSettings' (keyword arguments), `teacher` a checkpoint path."""

    store: str | list[str]
    students: list[str]
    out: str
    device: str = "cpu"
    resume: bool = False
    progress: bool | None = None
    eval_every: int = 0  # epochs between test evaluations; 0: the last epoch only
    model_code: tuple[str, ...] = ()  # package.module:factory names the user trusts the teacher checkpoint to name


def distill_trainer(job: DistillJob, evaluation: tuple[torch.Tensor, torch.Tensor] | None = None,
                    teacher: nn.Module | None = None, source: Any = None) -> Trainer:
    """The trainer for a job: every student in one pass over `source` (default: the job's store); `teacher`
    (default: the job's teacher checkpoint, if any) relabels every augmented view online."""
    for name in job.students:
        check_model_name(name)
    if teacher is None and job.teacher is not None:
        teacher = load_model(job.teacher, "teacher", job.model_code)[0]
    if source is None:
        source = StoreSource(job.store, job.batch_size, seed=job.seed, workers=job.workers, max_images=job.max_images,
                             views=job.views and teacher is None)
    cfg = TrainConfig(epochs=job.epochs, seed=job.seed, augment=job.augment, device=job.device, out_dir=job.out,
                      resume=job.resume, progress=job.progress, eval_every=job.eval_every or job.epochs,
                      amp=job.amp, compile=job.compile, cuda_graphs=job.cuda_graphs, clip_grad_norm=job.clip_grad_norm,
                      objective=Objective(kd=job.kd, ce_teacher=job.ce_teacher, temperature=job.temperature))
    specs = [StudentSpec(s, job.optimizer, job.peak_lr, weight_decay=job.weight_decay) for s in job.students]
    return Trainer(source, specs, cfg, teacher=teacher, eval_data=evaluation)


def at_chance_warning(student: str, fix: str) -> str:
    """The line for a student that ended agreeing with its targets at chance; `fix` says in the front end's words
    (flags or pipeline keys) what to change."""
    return (f"warning: student {student} ended agreeing with its targets at chance: it learned nothing; lower the "
            f"learning rate, or try {fix}")


def run_distill(job: DistillJob, evaluation: tuple[torch.Tensor, torch.Tensor] | None = None,
                teacher: nn.Module | None = None, source: Any = None,
                on_start: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
    """Distill every student in one pass over `source` (default: the job's store); returns the trainer's metrics
    plus seconds, images, the students at chance and this process's rank. `on_start` sees the trainer before the
    first step (where a resumed run starts)."""
    t0 = time.perf_counter()
    trainer = distill_trainer(job, evaluation, teacher, source)
    if on_start is not None:
        on_start(trainer)
    metrics = trainer.fit()
    metrics["seconds"] = time.perf_counter() - t0
    metrics["images"] = trainer.source.images_per_rank() * trainer.world  # what the students trained on
    metrics["at_chance"] = trainer.at_chance()  # students that learned nothing: said by the caller
    metrics["rank"] = trainer.rank  # only rank 0's metrics are the run's to report
    return metrics
