"""One engine for every kind of training: K students fed by one pass over a source.

Each batch is read and decoded once, augmented once, and given to every student; each student keeps
its own optimizer, cosine schedule, checkpoint and metrics. Distillation from a store, classical KD
with an online teacher, and plain supervised training (teachers) differ only in the source, the
objective's weights and whether a teacher is present.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..store.toolbox import fs
from ..store.toolbox.errors import DfkdError
from ..store.toolbox.identity import check_same_run, plain, weights_fingerprint
from ..store.toolbox.progress import progress
from ..store.toolbox.compute import DISTILL_LR, amp_dtype, make_optimizer, rank_and_world

from .augment import augment, normalize
from .checkpoint import ModelSpec, read_checkpoint, save_model
from .evaluate import accuracy
from .losses import Objective
from .sources import Source


class TrainError(DfkdError):
    """A training run that cannot start or resume as asked."""


@dataclass
class StudentSpec:
    """One student: architecture and its optimizer; lr None: the distillation default (DISTILL_LR)."""

    arch: str
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float = 5e-4


@dataclass
class TrainConfig:
    """How the run trains: epochs, seed, augmentation, loss weights, where outputs go."""

    epochs: int = 10
    seed: int = 0
    augment: str = "none"
    objective: Objective = field(default_factory=Objective)
    clip_grad_norm: float = 0.0  # each step's gradient scaled down to this total norm when above it; 0: never
    device: str = "cpu"
    out_dir: str | None = None
    resume: bool = False
    eval_every: int = 1
    progress: bool | None = None  # None: show bars only on a terminal
    amp: str = "auto"  # mixed precision on CUDA: auto (bf16 if supported, else fp16 + grad scaler), off, bf16, fp16
    compile: bool = False  # torch.compile each student's training forward
    cuda_graphs: bool = False  # each student's step replayed as a CUDA graph (CUDA, one process, not fp16/compile)
    label: str = "distill"  # what its progress lines call the run (train-teacher for supervised training)


@dataclass
class Student:
    """A student being trained: its model, optimizer, schedule and running metrics."""

    name: str
    spec: ModelSpec
    student: StudentSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_model: nn.Module | None = None  # the model as trained: DDP-wrapped under torch.distributed
    scaler: Any = None  # a GradScaler (active with fp16 autocast only)
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: list[torch.Tensor] = field(default_factory=list)  # the epoch's loss sum and agreement, on the device
    graph: Any = None  # the step captured as a CUDA graph (store.toolbox.cuda_graph.GraphedStep) for `graph_shape`
    graph_shape: tuple | None = None


def _parallel(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """DDP around the model when running under torch.distributed (gradients averaged across ranks)."""
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _reduce_sums(values: list[torch.Tensor | float], world: int, device: torch.device) -> list[float]:
    """Sums over ranks (one all-reduce for the lot)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t.tolist()


def _init_seed(seed: int, name: str) -> int:
    """A student's initialization seed from the run's seed and its name alone, so a student trained in one pass
    with others starts from the weights it gets alone (and the pass equals separate runs)."""
    import zlib

    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _names(specs: list[StudentSpec]) -> list[str]:
    """Unique names: the architecture, suffixed -2, -3... when it repeats."""
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        base = s.arch.replace(":", "_").replace("/", "_")
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


class Trainer:
    """Trains students from a source; optionally an online teacher makes the targets."""

    def __init__(self, source: Source, students: list[StudentSpec], config: TrainConfig,
                 teacher: nn.Module | None = None, eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 on_epoch_end: Callable[[int, "Trainer"], None] | None = None) -> None:
        if not students:
            raise TrainError("give at least one student")
        self.source, self.cfg, self.teacher, self.eval_data = source, config, teacher, eval_data
        self.on_epoch_end = on_epoch_end
        self.device = torch.device(config.device)
        self.batches_read = 0
        self.rank, self.world = rank_and_world()
        self.amp = amp_dtype(config.amp, self.device)
        self.reads_per_rank: list[Any] = []
        self.views = bool(getattr(source, "views", False))  # the source yields stored views with their logits
        if self.views and teacher is not None:
            raise TrainError(f"{source.name} yields stored view labels and a teacher was given too; use one: the "
                             "teacher relabels views online, the store's view labels need no teacher")
        if source.num_classes < 2:  # one class: every loss is 0 and nothing is learned
            raise TrainError(f"{source.name} has {source.num_classes} class; a classifier needs at least 2")
        c, h, w = source.image_shape
        if h != w:
            raise TrainError(f"images are {h}×{w}; the zoo's models take square images")
        if eval_data is not None:
            if tuple(eval_data[0].shape[1:]) != tuple(source.image_shape):
                raise TrainError(f"evaluation images are {tuple(eval_data[0].shape[1:])} but {source.name} holds "
                                 f"{tuple(source.image_shape)}; evaluate on the data the teacher was trained on")
            if int(eval_data[1].max()) >= source.num_classes:
                raise TrainError(f"evaluation labels reach {int(eval_data[1].max())} but {source.name} has "
                                 f"{source.num_classes} classes; evaluate on the teacher's own dataset")
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        steps = config.epochs * len(source)
        self.graphs = graphs_on(config, self.device, self.world, self.amp)
        self.students: list[Student] = []
        for i, (name, s) in enumerate(zip(_names(students), students)):
            torch.manual_seed(_init_seed(config.seed, name))  # (seed, name) only: as in a run of its own
            spec = ModelSpec(s.arch, source.num_classes, c, h, tuple(source.mean), tuple(source.std))
            model = spec.build().to(self.device)  # the same initial weights on every rank (same seed)
            if self.device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            opt = make_optimizer(model.parameters(), s.optimizer, DISTILL_LR[s.optimizer] if s.lr is None else s.lr, s.weight_decay,
                                 graph_device=self.device if self.graphs else None)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / max(1, steps))))
            train_model = _parallel(model, self.device, self.world)
            if config.compile:
                train_model = torch.compile(train_model)
            self.students.append(Student(name, spec, s, model, opt, sched, train_model,
                                         scaler=torch.amp.GradScaler(self.device.type,
                                                                     enabled=self.amp == torch.float16)))
        self.start_epoch = 0
        # once, when the run checkpoints: what it trains on, saved with every checkpoint and checked on resume
        self.identity = None if config.out_dir is None else self._identity()
        if config.resume:
            self._resume()

    # -- checkpoints -------------------------------------------------------------------------------
    def _run_file(self) -> str | None:
        return None if self.cfg.out_dir is None else os.path.join(self.cfg.out_dir, "run.pt")

    def _identity(self) -> dict[str, Any]:
        """Everything the weights of an uninterrupted run depend on (checked by store.toolbox.identity on resume)."""
        c = self.cfg
        return plain({"source": self.source.identity(), "students": [asdict(s.student) for s in self.students],
                      "epochs": c.epochs, "seed": c.seed, "augment": c.augment, "objective": asdict(c.objective),
                      **({"clip_grad_norm": c.clip_grad_norm} if c.clip_grad_norm else {}),  # runs from before it resume
                      "compute": {"device": self.device.type, "amp": str(self.amp), "world_size": self.world,
                                  **({"cuda_graphs": True} if self.graphs else {})},  # fused optimizers: other rounding
                      "teacher": None if self.teacher is None else weights_fingerprint(self.teacher.state_dict())})

    def _save(self, epoch: int) -> None:
        if self.cfg.out_dir is None or self.rank != 0:  # one writer: every rank holds the same weights
            return
        for s in self.students:
            save_model(os.path.join(self.cfg.out_dir, f"{s.name}.pt"), s.model, s.spec, {"history": s.history})
        fs.save_torch({"identity": self.identity, "epoch": epoch, "batches_read": self.batches_read,
                     "students": [{"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                                   "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(),
                                   "history": s.history}
                                  for s in self.students]}, self._run_file())
        fs.write_text_atomic(os.path.join(self.cfg.out_dir, "metrics.json"), json.dumps(self.metrics(), indent=1))

    def _resume(self) -> None:
        path = self._run_file()
        if path is None or not os.path.exists(path):
            return  # nothing to resume: start from scratch
        state = read_checkpoint(path, "run checkpoint")
        check_same_run(state.get("identity"), self.identity, path, "use the original settings, or another --out")
        for s, st in zip(self.students, state["students"]):
            s.model.load_state_dict(st["model"])
            s.optimizer.load_state_dict(st["optimizer"])
            s.scheduler.load_state_dict(st["scheduler"])
            if st.get("scaler"):
                s.scaler.load_state_dict(st["scaler"])
            s.history = st["history"]
        self.start_epoch, self.batches_read = state["epoch"] + 1, state["batches_read"]

    # -- training ----------------------------------------------------------------------------------
    def _targets(self, x: torch.Tensor, stored: torch.Tensor | None, augmented: bool) -> torch.Tensor | None:
        """Teacher logits for this batch: the online teacher's when present and needed, else the stored ones."""
        if self.teacher is not None and (stored is None or augmented):
            with torch.no_grad():
                return self.teacher(x).float()
        return None if stored is None else stored.to(self.device, non_blocking=True).float()

    def fit(self) -> dict[str, Any]:
        """Train every student for the remaining epochs (train, score, checkpoint each); returns the metrics."""
        cfg = self.cfg
        epochs = progress(total=cfg.epochs, initial=self.start_epoch, desc=cfg.label, unit="epoch",
                          show=cfg.progress if self.rank == 0 else False)
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            seen = self._train_epoch(epoch)
            self._score_epoch(epoch, seen, time.perf_counter() - t0)
            self._checkpoint(epoch)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, self)
            last = {s.name: s.history[-1] for s in self.students}
            epochs.set_postfix({n: f"{r['test_top1']:.4f}" if "test_top1" in r else f"loss {r['loss']:.3g}"
                                for n, r in last.items()})
            epochs.update()
        epochs.close()
        return self.metrics()

    def _train_epoch(self, epoch: int) -> int:
        """One pass over the source, every batch read, augmented and normalized once and stepped by every student;
        returns the images this rank saw (the students' loss and agreement sums stay on the device)."""
        cfg, obj = self.cfg, self.cfg.objective
        tty = cfg.progress is True or (cfg.progress is None and sys.stderr.isatty())  # a batch bar inside the epoch
        self.source.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        seen = 0
        for s in self.students:
            s.model.train()
            if not s.sums:  # the same tensors every epoch: a captured step adds into them
                s.sums = [torch.zeros((), device=self.device), torch.zeros((), device=self.device)]
            for t in s.sums:
                t.zero_()
        bar = progress(self.source, total=len(self.source), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       show=tty and self.rank == 0, leave=False)
        for images, stored, labels in bar:
            self.batches_read += 1
            if self.device.type == "cuda":  # page-locked host memory: the copy overlaps compute
                images = images.pin_memory()
            images = images.to(self.device, non_blocking=True)
            mode = "none" if self.views else cfg.augment  # stored views are the augmentation, labelled already
            x = normalize(augment(images, mode, gen), self.source.mean, self.source.std)
            teacher = self._targets(x, stored, mode != "none")
            if obj.needs_teacher and teacher is None:
                raise TrainError(f"{self.source.name} gives no teacher logits; pass a teacher for online targets")
            y = None if labels is None else labels.to(self.device, non_blocking=True)
            ref = teacher.argmax(1) if teacher is not None else y  # what agreement is counted against, once
            for s in self.students:
                self._step(s, (x, teacher, y, ref))
                s.scheduler.step()
            seen += len(x)
            if tty and bar.n % 20 == 0:  # reading the sums syncs the device, so only now and then
                bar.set_postfix({s.name: f"{float(s.sums[0]) / max(1, seen):.3f}" for s in self.students})
        return seen

    def _score_epoch(self, epoch: int, seen: int, seconds: float) -> None:
        """Each student's epoch row (loss and agreement summed over ranks, test top-1 where due) in its history; a
        loss no longer finite stops every rank before anything is saved."""
        cfg = self.cfg
        evaluate = self.eval_data is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        for s in self.students:
            loss_sum, agree, total = _reduce_sums([*s.sums, seen], self.world, self.device)
            if not math.isfinite(loss_sum):  # every rank sees the same sum: all stop, nothing is saved
                raise TrainError(f"student {s.name}'s loss became {loss_sum} in epoch {epoch + 1}; its weights are "
                                 "no longer finite and were not saved: lower --lr, or check the store with "
                                 "`dfkd store verify`")
            row = {"epoch": epoch + 1, "loss": loss_sum / max(1, total), "train_agreement": agree / max(1, total),
                   "seconds": round(seconds, 3)}
            if evaluate and self.rank == 0:
                row["test_top1"] = accuracy(s.model, *self.eval_data, self.source.mean, self.source.std,
                                            device=str(self.device))
            s.history.append(row)

    def _checkpoint(self, epoch: int) -> None:
        """Rank 0 writes the students, run.pt and metrics.json; every rank's batch count is gathered first, and no
        rank starts the next epoch (or reads run.pt) before the write."""
        if self.world > 1:
            import torch.distributed as dist

            self.reads_per_rank = [None] * self.world
            dist.all_gather_object(self.reads_per_rank, self.batches_read)
        self._save(epoch)
        if self.world > 1:
            dist.barrier()

    def _step(self, s: Student, batch: tuple[torch.Tensor | None, ...]) -> None:
        """One optimizer step of one student on a batch (x, teacher logits, labels, agreement reference; absent ones
        None), its loss and agreement added into `s.sums` on the device (no host sync per step); replayed as a CUDA
        graph where `self.graphs` and the batch has the captured shape."""
        if not self.graphs:
            return self._eager_step(s, *batch)
        present = tuple(t is not None for t in batch)
        inputs = tuple(t for t in batch if t is not None)
        shape = (present, tuple((tuple(t.shape), t.dtype) for t in inputs))
        if s.graph is None:
            self._capture(s, inputs, shape)
        if shape != s.graph_shape:  # another batch size (an epoch's last batch): the same step, eagerly
            return self._eager_step(s, *batch)
        s.graph(*inputs)

    def _eager_step(self, s: Student, x: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor | None,
                    ref: torch.Tensor | None) -> None:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None,
                            cache_enabled=False if self.graphs else None):  # a graph cannot capture the cache
            out = (s.train_model or s.model)(x)
            loss = self.cfg.objective(out.float(), teacher, y)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        if self.cfg.clip_grad_norm:  # no host sync: the norm and the scale stay on the device (graph-safe)
            s.scaler.unscale_(s.optimizer)
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), self.cfg.clip_grad_norm, foreach=True)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        with torch.no_grad():
            s.sums[0].add_(loss.detach() * len(x))
            if ref is not None:
                s.sums[1].add_((out.argmax(1) == ref).sum())

    def _capture(self, s: Student, inputs: tuple, shape: tuple) -> None:
        """Capture s's step for this batch shape; the capture's warm-up steps are undone (weights, BN statistics,
        the optimizer's state back to new, the sums), so the run is the one it would be without graphs."""
        from ..store.toolbox.cuda_graph import GraphedStep

        def step(*t: torch.Tensor) -> None:
            it = iter(t)
            self._eager_step(s, *(next(it) if p else None for p in shape[0]))

        saved = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
        sums = [t.detach().clone() for t in s.sums]
        s.graph, s.graph_shape = GraphedStep(step, inputs), shape
        with torch.no_grad():
            for k, v in s.model.state_dict().items():
                v.copy_(saved[k])
            for state in s.optimizer.state.values():  # zeros: a first step from here is a first step
                for v in state.values():
                    if torch.is_tensor(v):
                        v.zero_()
            for t, v in zip(s.sums, sums):
                t.copy_(v)

    def at_chance(self) -> list[str]:
        """Students whose last epoch agreed with their targets no more than chance allows: they learned nothing
        (B's BN-free LeNet under SGD at T 20 ended so, 10.00%). Said after the run, never used to stop one: slow
        starters sat at chance for 20 epochs and ended at 68-79%."""
        chance = 1.5 / self.source.num_classes
        return [s.name for s in self.students if s.history and s.history[-1]["train_agreement"] <= chance]

    def metrics(self) -> dict[str, Any]:
        """Per-student history and final figures (the last epoch's, never a best epoch)."""
        out = {"source": self.source.name, "config": {**asdict(self.cfg), "objective": asdict(self.cfg.objective)},
               "batches_read": self.batches_read, "world_size": self.world, "students": {}}
        if self.world > 1:
            out["batches_read_per_rank"] = self.reads_per_rank
        for s in self.students:
            last = s.history[-1] if s.history else {}
            out["students"][s.name] = {"arch": s.spec.arch, "parameters": sum(p.numel() for p in s.model.parameters()),
                                       "final": last, "history": s.history}
        return out


def graphs_on(config: TrainConfig, device: torch.device, world: int, amp: torch.dtype | None) -> bool:
    """Whether the students' steps are replayed as CUDA graphs: asked for, on CUDA, in one process (no DDP hooks),
    without fp16 loss scaling (its inf check reads the device) or torch.compile."""
    return config.cuda_graphs and device.type == "cuda" and world == 1 and amp != torch.float16 and not config.compile
