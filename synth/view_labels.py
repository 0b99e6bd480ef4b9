"""The teacher's answers on seeded augmented views of stored images: what `synth --views K` stores with
every unit and `dfkd store label` adds to a finished store (the same function, so both give the same labels)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import store
from ..store.toolbox.progress import progress
from ..store.units import unit_seed
from ..store.views import ViewRecipe, unit_views

from .teacher import Labeller, fingerprint, teacher_labeller



def with_views(meta: store.StoreMeta, views: int, mode: str) -> store.StoreMeta:
    """`meta` keeping `views` labelled views per image drawn by `mode` (padding fixed for its image size)."""
    recipe = ViewRecipe(mode).resolved(meta.image_shape[1])
    return dataclasses.replace(meta, views=views, view_recipe=recipe.to_json() if views else None)


def label_views(logits_of: Labeller, images: torch.Tensor | np.ndarray, meta: store.StoreMeta, unit: int) -> np.ndarray:
    """The teacher's logits of every stored view of one unit's uint8 images: N×V×K float32."""
    recipe = ViewRecipe.from_json(meta.view_recipe, "the store")
    images = torch.as_tensor(np.asarray(images))
    pixels = unit_views(images, recipe, unit_seed(meta.base_seed, unit), meta.views)  # V×N×C×H×W
    flat = pixels.reshape(-1, *images.shape[1:])
    out = logits_of(flat)  # in batches of the labeller's size
    return out.reshape(meta.views, len(images), -1).transpose(0, 1).float().numpy()


def label_store(path: str, teacher: nn.Module, views: int, *, mode: str = "flip-crop", resume: bool = False,
                overwrite: bool = False, device: str = "cpu", show: bool | None = None) -> dict[str, Any]:
    """Add the teacher's logits of `views` seeded views of every finished image to the store at `path`.

    Each unit's views are written whole with their flag last, so a killed run plus `resume` equals an
    uninterrupted one. The teacher must be the one that made the store (its weights' fingerprint)."""
    t0 = time.perf_counter()
    if views < 1:
        raise store.StoreError(f"views must be >= 1, got {views}")
    writer = store.open_writer(path)
    meta = writer.meta
    made_by = meta.provenance.get("teacher_fingerprint")
    teacher = teacher.to(device).eval()
    if made_by and made_by != fingerprint(teacher):
        raise store.StoreError(f"{path} was made by another teacher (fingerprint {made_by[:12]}, this one "
                               f"{fingerprint(teacher)[:12]}); label a store with the teacher that made it")
    if meta.mean is None or meta.std is None:
        raise store.StoreError(f"{path} records no normalization mean/std, so the teacher's input is unknown; "
                               "re-create the store with dfkd synth")
    wanted = with_views(meta, views, mode)
    backend = writer.backend
    if meta.views:
        same = (meta.views, meta.view_recipe) == (wanted.views, wanted.view_recipe)
        started = backend.views_done_mask().any()
        if not same and not overwrite:
            raise store.StoreError(f"{path} already keeps {meta.views} views ({meta.view_recipe['mode']}); pass "
                                   "--overwrite to replace them with these, or label with the same settings")
        if same and started and not (resume or overwrite):
            raise store.StoreError(f"{path} already has view labels; pass --resume to finish them or --overwrite "
                                   "to label it again")
        if overwrite:
            backend.add_views(wanted)
    else:
        backend.add_views(wanted)
    meta = backend.meta
    logits_of = teacher_labeller(teacher, meta.mean, meta.std, device)
    labelled = backend.views_done_mask()
    for u in np.flatnonzero(labelled).tolist():  # a damaged view block is labelled again
        try:
            backend.read_views(u)
        except store.StoreError:
            labelled[u] = False
    todo = np.flatnonzero(backend.done_mask() & ~labelled).tolist()
    for u in progress(todo, desc=f"labelling {views} views -> {path}", unit="unit", show=show):
        rec = backend.read_unit(u, with_views=False)
        backend.write_views(u, label_views(logits_of, rec.images, meta, u))
    backend.finalize()
    return {"store": path, "views": views, "units_labelled": len(todo), 
            "teacher_forwards": views * sum(hi - lo for lo, hi in map(meta.unit_range, todo)), "seconds": time.perf_counter() - t0}
