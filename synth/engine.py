"""The synthesis engine: fills a store with a method's images and the teacher's logits of those images.

It owns targets (class-balanced), per-unit seeds, resume, quantization to uint8, logits recomputed on
the stored uint8 image, done flags, progress and provenance; a method only makes images.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import store
from ..store.toolbox import fs
from ..store.toolbox.progress import progress
from ..store.toolbox.compute import amp_dtype, rank_and_world
from ..store.toolbox.version import __version__ as VERSION

from .modes import frozen
from .methods import MethodError, SynthContext, create_method, list_methods, method_class, method_config
from .side_files import side_file
from .teacher import fingerprint
from .view_labels import label_views, with_views


@dataclass
class SynthConfig:
    """Where and how much: image count, batch (= write unit), seed, store options, device."""

    num_images: int
    out: str
    batch_size: int = 256
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    progress: bool | None = None
    amp: str = "auto"  # mixed precision on CUDA: auto (bf16 if supported, else fp16), off, bf16, fp16
    compile: bool = False  # torch.compile the teacher's forward (in place: layer paths stay those of the model)
    cuda_graphs: bool = False  # inversion iterations replayed as CUDA graphs (store.toolbox.cuda_graph)
    units_in_flight: int = 1  # inversion methods: this many units optimized side by side in one batch
    views: int = 0  # also store the teacher's logits of this many seeded augmented views of every image
    view_mode: str = "flip-crop"  # how those views are drawn (store.views.VIEW_MODES)
    bank: tuple[str, ...] = ()  # fast/nayer: stores of this teacher the memory bank starts from (a top-up)


def unit_targets(lo: int, hi: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Class-balanced labels for samples [lo, hi) (index mod K, so the whole store is balanced), shuffled."""
    labels = torch.arange(lo, hi) % num_classes
    return labels[torch.randperm(hi - lo, generator=gen)]


def quantize(x01: torch.Tensor) -> torch.Tensor:
    """Pixel space [0, 1] -> uint8, rounding to nearest."""
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8)


def synthesize(teacher: nn.Module, method: str, cfg: SynthConfig, *, image_shape: tuple[int, int, int],
               num_classes: int, mean: tuple[float, ...], std: tuple[float, ...], hparams: dict[str, Any] | None = None,
               record: Any = None, student: nn.Module | None = None, teacher_spec: dict[str, Any] | None = None,
               on_trained: Callable[[bool], None] | None = None) -> store.StoreWriter:
    """Fill (or finish) the store at cfg.out with `method`'s images of `teacher`; returns the writer.

    Plan (the store's metadata and provenance), prepare (the method on its context, the store, what the method
    trains before sampling), fill (the pending units), finalize. `on_trained(wrote)` runs on rank 0 after a
    generator method's training, before the fill: `wrote` says whether this run (re)wrote the generator, so the
    caller saves the proxy student with it, never after.
    """
    device = torch.device(cfg.device)
    amp = amp_dtype(cfg.amp, device)
    teacher = teacher.to(device)
    fp = fingerprint(teacher)
    if record is not None:
        record.check_teacher(fp, "the statistics record")
    rank, world = rank_and_world()
    meta = _plan(method, cfg, hparams, fp, record, teacher_spec, tuple(image_shape), num_classes, mean, std, amp,
                 world)
    show = cfg.progress if rank == 0 else False  # None: a bar on a terminal, log lines otherwise (dfkd.progress)
    with frozen(teacher, student):
        ctx = _context(teacher, student, cfg, tuple(image_shape), num_classes, mean, std, fp, record, amp)
        m = create_method(method, ctx, hparams)  # a teacher the method cannot serve fails here, before the store
        if cfg.units_in_flight > 1 and not m.units_in_flight:
            raise MethodError(f"{method} makes one unit at a time; --units-in-flight is for "
                              f"{', '.join(n for n in list_methods() if method_class(n).units_in_flight)}")
        try:
            writer, snapshot = _open_store(cfg, meta, rank, world)
            if m.trains_before_sampling and not snapshot.all():  # generator methods train before they sample
                _prepare_on_rank0(m, cfg, rank, world, show, on_trained)
            _fill(m, writer, snapshot, cfg, teacher, ctx, rank, world, show, method, on_trained)
        finally:
            m.close()
    _barrier(world)
    if rank == 0:  # after every rank's last unit
        writer.finalize()
    return writer


def _plan(method: str, cfg: SynthConfig, hparams: dict[str, Any] | None, fp: str, record: Any,
          teacher_spec: dict[str, Any] | None, image_shape: tuple[int, int, int], num_classes: int,
          mean: tuple[float, ...], std: tuple[float, ...], amp: torch.dtype | None, world: int) -> store.StoreMeta:
    """The store's metadata: its plan and everything its content depends on (provenance); nothing is written."""
    config = method_config(method, hparams)  # validates names, types and bounds before anything is written
    provenance = {"method": method, "hparams": asdict(config), "teacher_fingerprint": fp,
                  "teacher": teacher_spec or {}, "record": None if record is None else
                  {"layers": record.layers, "num_images": record.num_images, "data": record.data},
                  "compute": {"device": torch.device(cfg.device).type,
                              "amp": None if amp is None else str(amp).replace("torch.", ""),
                              **({"units_in_flight": cfg.units_in_flight} if cfg.units_in_flight > 1 else {})},
                  "dfkd_version": VERSION, "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    if method_class(method).sequential:  # the content depends on the chains, so a resume must keep their number
        provenance["sequential"] = {"chains": world, "order": "one chain per rank over a contiguous range of units; "
                                    "each unit depends on every earlier unit of its chain"}
        if any(fs.same_location(b, cfg.out) for b in cfg.bank):
            raise MethodError(f"--bank {cfg.out} is the store being written; a top-up starts from other stores")
        if cfg.bank:
            provenance["sequential"]["bank"] = [store.open(p).identity() for p in cfg.bank]
    elif cfg.bank:
        raise MethodError(f"{method} keeps no memory bank; --bank (a top-up) is for the memory-bank methods fast and nayer")
    meta = store.StoreMeta(num_samples=cfg.num_images, image_shape=image_shape, num_classes=num_classes,
                           unit_size=cfg.batch_size, logits_dtype="float32", base_seed=cfg.seed,
                           mean=tuple(mean), std=tuple(std), provenance=provenance)
    return with_views(meta, cfg.views, cfg.view_mode) if cfg.views else meta


def _context(teacher: nn.Module, student: nn.Module | None, cfg: SynthConfig, image_shape: tuple[int, int, int],
             num_classes: int, mean: tuple[float, ...], std: tuple[float, ...], fp: str, record: Any,
             amp: torch.dtype | None) -> SynthContext:
    """What a method may use, on the device: the teacher (NHWC on CUDA, compiled in place if asked), the student."""
    device = torch.device(cfg.device)
    net, stu = teacher, None if student is None else student.to(device)
    if device.type == "cuda":  # NHWC convolutions are the fast path for tensor cores
        net = net.to(memory_format=torch.channels_last)
        stu = None if stu is None else stu.to(memory_format=torch.channels_last)
    if cfg.compile:  # Module.compile, not torch.compile(net): no `_orig_mod.` wrapper, so every layer path
        net.compile()  # (records, layers=, at_layers, feature_layer) and every hook addresses the model itself
    return SynthContext(net, image_shape, num_classes, tuple(mean), tuple(std), device, fp, record, stu, amp,
                        cuda_graphs=cfg.cuda_graphs and device.type == "cuda")


def _fill(m: Any, writer: store.StoreWriter, snapshot: np.ndarray, cfg: SynthConfig, teacher: nn.Module,
          ctx: SynthContext, rank: int, world: int, show: bool | None, method: str,
          on_trained: Callable[[bool], None] | None) -> None:
    """Make and write this rank's pending units: a chain, groups in flight, or one unit at a time."""
    if m.sequential:
        made = not snapshot.all()
        if made:
            _fill_chain(m, writer, snapshot, cfg, teacher, rank, world, show, method)
        if rank == 0 and on_trained is not None:
            on_trained(made)  # the proxy student as the chain left it
    elif cfg.units_in_flight > 1:
        _fill_in_flight(m, writer, snapshot, cfg, teacher, ctx, rank, world, show, method)
    else:
        bar = progress(writer.pending_units(rank, world, done=snapshot), desc=f"{method} -> {cfg.out}",
                       unit="batch", show=show)
        done, t0 = 0, time.perf_counter()
        for u in bar:
            images, logits, labels, losses = _make_unit(m, writer, u, teacher, ctx)
            writer.write_unit(u, images.numpy(), logits.numpy(), labels, _views(writer, u, images, ctx))
            done += len(images)
            bar.set_postfix(img_s=f"{done / (time.perf_counter() - t0):.1f}",
                            **{k: f"{v:.3g}" for k, v in losses.items()})


def _make_unit(m: Any, writer: store.StoreWriter, u: int, teacher: nn.Module,
               ctx: SynthContext) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, dict[str, float]]:
    """One unit: its seeded class-balanced targets, the method's images, uint8, the teacher's logits of them."""
    return _make_units(m, writer, [u], ctx)[0]


def _make_units(m: Any, writer: store.StoreWriter, units: list[int],
                ctx: SynthContext) -> list[tuple[torch.Tensor, torch.Tensor, np.ndarray, dict[str, float]]]:
    """Units made together (`synthesize_units`), each from its own seed: targets, images, uint8, logits."""
    gens = [torch.Generator().manual_seed(writer.unit_seed(u)) for u in units]
    targets = [unit_targets(*writer.unit_range(u), ctx.num_classes, g) for u, g in zip(units, gens)]
    with torch.enable_grad():
        made = m.synthesize_units([t.to(ctx.device) for t in targets], gens) if len(units) > 1 else \
            [m.synthesize(targets[0].to(ctx.device), gens[0])]
    out = []
    for u, t, (x01, losses) in zip(units, targets, made):
        bad = sorted(k for k, v in losses.items() if not math.isfinite(v))
        if bad:  # the unit's images are whatever a NaN step left: write nothing, say so
            raise MethodError(f"{m.name}'s loss {bad[0]} became {losses[bad[0]]} in unit {u}; nothing of that unit "
                              "was written: lower the method's lr (--set lr=...), or check the teacher's weights")
        images = quantize(x01.detach()).cpu()
        logits = ctx.stored_logits(images)
        labels = logits.argmax(1) if m.labels_from_teacher else t
        out.append((images, logits, labels.cpu().numpy().astype(np.int64), losses))
    return out


def flight_groups(meta: store.StoreMeta, size: int) -> list[list[int]]:
    """The store's units in fixed groups of `size` consecutive indices (a shorter last unit alone), made together:
    fixed by index, so a resume re-makes a group exactly as the uninterrupted run did."""
    groups = []
    for start in range(0, meta.num_units, size):
        units = list(range(start, min(start + size, meta.num_units)))
        full = [u for u in units if meta.unit_range(u)[1] - meta.unit_range(u)[0] == meta.unit_size]
        groups += [g for g in (full, [u for u in units if u not in full]) if g]
    return groups


def _fill_in_flight(m: Any, writer: store.StoreWriter, snapshot: np.ndarray, cfg: SynthConfig, teacher: nn.Module,
                    ctx: SynthContext, rank: int, world: int, show: bool, method: str) -> None:
    """Fill with `units_in_flight` units a batch: this rank's share of the groups with a unit still missing; a
    group's finished units are made again with it (so the others come out as in one run) but not rewritten."""
    from ..store.units import share

    pending = share([g for g in flight_groups(writer.meta, cfg.units_in_flight) if not all(snapshot[g])], rank, world)
    bar = progress(total=sum(len(g) for g in pending), desc=f"{method} -> {cfg.out}", unit="batch", show=show)
    done, t0 = 0, time.perf_counter()
    for group in pending:
        for u, (images, logits, labels, losses) in zip(group, _make_units(m, writer, group, ctx)):
            if not snapshot[u]:
                writer.write_unit(u, images.numpy(), logits.numpy(), labels, _views(writer, u, images, ctx))
            done += len(images)
        bar.update(len(group))
        bar.set_postfix(img_s=f"{done / (time.perf_counter() - t0):.1f}", **{k: f"{v:.3g}" for k, v in losses.items()})
    bar.close()


def _views(writer: store.StoreWriter, u: int, images: torch.Tensor, ctx: SynthContext) -> np.ndarray | None:
    """The teacher's logits of the unit's stored views, where the store keeps views."""
    if not writer.meta.views:
        return None
    return label_views(ctx.stored_logits, images, writer.meta, u)


def chain_units(num_units: int, rank: int, world: int) -> list[int]:
    """A sequential method's chain on this rank: a contiguous, near-equal range of the units."""
    return list(range(rank * num_units // world, (rank + 1) * num_units // world))


def chain_state_path(out: str, rank: int, world: int) -> str:
    """Where a rank's chain checkpoint lies beside the store."""
    return side_file(out, "chain", rank, world)


def _fill_chain(m: Any, writer: store.StoreWriter, snapshot: np.ndarray, cfg: SynthConfig, teacher: nn.Module,
                rank: int, world: int, show: bool, method: str) -> None:
    """Run this rank's chain to its end: units found done are made again to move the chain on, never rewritten."""
    units = chain_units(writer.meta.num_units, rank, world)
    start = m.begin_chain(cfg.out, chain_state_path(cfg.out, rank, world), units, snapshot,
                          seed=writer.unit_seed(units[0]) if units else cfg.seed, resume=cfg.resume, bank=cfg.bank)
    bar = progress(units[start:], initial=start, total=len(units), desc=f"{method} -> {cfg.out}", unit="batch",
                   show=show)
    for u in bar:
        images, logits, labels, losses = _make_unit(m, writer, u, teacher, m.ctx)
        if not snapshot[u]:
            writer.write_unit(u, images.numpy(), logits.numpy(), labels, _views(writer, u, images, m.ctx))
        m.end_unit(u, images)
        bar.set_postfix(**{k: f"{v:.3g}" for k, v in losses.items()})


def _prepare_on_rank0(m: Any, cfg: SynthConfig, rank: int, world: int, show: bool,
                      on_trained: Callable[[bool], None] | None) -> None:
    """One generator for the whole store: rank 0 trains it while the others wait with no time limit (training
    may take hours), then load it; an error on rank 0 ends every rank with the same one line."""
    failure: str | None = None
    if rank == 0:
        try:
            wrote = m.prepare(cfg.out, resume=cfg.resume, seed=cfg.seed, show=show)
            if on_trained is not None:
                on_trained(wrote)
        except store.DfkdError as e:
            if world == 1:
                raise
            failure = str(e)
        except BaseException as e:
            if world == 1:
                raise
            failure = f"rank 0 failed while training the generator ({type(e).__name__}: {e})"
    if world == 1:
        return
    failure = _from_rank0(failure)
    if failure is not None:
        raise MethodError(failure)
    if rank != 0:
        m.load_trained(cfg.out)


def _from_rank0(payload: Any) -> Any:
    """Rank 0's payload on every rank, through a gloo group without a practical timeout (the default
    group's 30 minutes would end the waiting ranks during a long generator training)."""
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))
    box = [payload]
    dist.broadcast_object_list(box, src=0, group=group)
    dist.destroy_process_group(group)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _open_store(cfg: SynthConfig, meta: store.StoreMeta, rank: int, world: int) -> tuple[store.StoreWriter, np.ndarray]:
    """Rank 0 creates (or resumes) the store; every rank then opens it and gets rank 0's done snapshot.

    Sharing one snapshot makes every rank deal out the same pending units; an error on rank 0 (a store
    in the way, other settings) reaches every rank as the same one-line error instead of a hang.
    """
    payload: Any = None
    if rank == 0:
        try:
            writer = store.create_or_resume(cfg.out, meta, resume=cfg.resume, overwrite=cfg.overwrite)
            payload = writer.done_mask().copy()
        except store.DfkdError as e:
            payload = str(e)
    if world > 1:
        import torch.distributed as dist

        box = [payload]
        dist.broadcast_object_list(box, src=0)
        payload = box[0]
    if isinstance(payload, str):
        raise store.StoreError(payload)
    return (writer if rank == 0 else store.open_writer(cfg.out, lock=False)), np.asarray(payload, dtype=bool)
