"""Tiny teachers and stores for distillation tests: a store made from real digits and a teacher's logits."""

from __future__ import annotations

import numpy as np
import torch

from dfkd import store
from dfkd.distill.augment import normalize
from dfkd.distill.checkpoint import ModelSpec, save_model
from dfkd.distill.losses import Objective
from dfkd.distill.sources import TensorSource
from dfkd.distill.trainer import StudentSpec, TrainConfig, Trainer
from dfkd.pipelines.real_data import load_data


def train_digits_teacher(path: str, epochs: int = 8) -> float:
    """An MLP teacher on digits (~1 s); returns its test accuracy."""
    d = load_data("digits")
    src = TensorSource(d.train_images, d.train_labels, 10, d.mean, d.std, 64, seed=0)
    tr = Trainer(src, [StudentSpec("mlp")], TrainConfig(epochs=epochs, objective=Objective(kd=0, ce_label=1)),
                 eval_data=(d.test_images, d.test_labels))
    tr.fit()
    s = tr.students[0]
    save_model(path, s.model, s.spec, {"test_top1": s.history[-1]["test_top1"]})
    return s.history[-1]["test_top1"]


def teacher_store(path: str, teacher: torch.nn.Module, spec: ModelSpec, unit_size: int = 128,
                  num_classes: int | None = None) -> None:
    """A store of the digits training images with the teacher's logits (a perfect 'synthesizer')."""
    d = load_data("digits")
    with torch.no_grad():
        logits = teacher.eval()(normalize(d.train_images, spec.mean, spec.std)).numpy()
    k = num_classes or 10
    logits = logits[:, :k]
    meta = store.StoreMeta(num_samples=len(logits), image_shape=spec.image_shape, num_classes=k, unit_size=unit_size,
                           mean=spec.mean, std=spec.std, logits_dtype="float32")
    w = store.create(path, meta, overwrite=True)
    for u in w.pending_units():
        lo, hi = w.unit_range(u)
        labels = np.minimum(d.train_labels[lo:hi].numpy(), k - 1)
        w.write_unit(u, d.train_images[lo:hi].numpy(), logits[lo:hi], labels)
    w.finalize()
