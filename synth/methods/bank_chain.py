"""The memory-bank methods' shared chain (Fast, NAYER): synthesis that learns from its own store.

Each write unit is one synthesized batch. Before it, the proxy student trains `kd_steps` steps on the units
the chain has already written (the memory bank, read through `store/`); the batch is then optimized on the
teacher's feature statistics, cross-entropy to its class-balanced targets and, after `warmup` units, the
proxy student's disagreement with the teacher. A unit depends on every unit before it in its chain, so the
chain's whole state (generator, proxy student, optimizers, running statistics, random state) is
checkpointed atomically beside the store at unit boundaries, and a unit found already written when a
resumed chain reaches it is made again (to move the chain on) but not rewritten: a run killed anywhere and
resumed equals an uninterrupted one byte for byte.

Under torchrun each rank runs its own chain over a contiguous range of units, with its own generator and
proxy student: the store is deterministic for a given world size; another world size makes another store
(the provenance says so, and --resume refuses the mismatch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...store.toolbox import fs
from ...store.toolbox.augment import augment
from ...store.toolbox.compute import make_optimizer
from ...store.toolbox.declared import setting
from ...store.toolbox.identity import check_same_run

from ..memory_bank import MemoryBank
from ..modes import training
from ..side_files import side_file
from ..losses import agreement_kl, kl_divergence
from .base import Method, MethodError, SynthContext
from .deepinversion import StatTerms


@dataclass
class BankConfig:
    """Shared by the memory-bank methods: the batch's losses and steps, and the proxy student's schedule.

    Loss weights are the papers' CIFAR settings (w_bn 10, w_oh 0.5, w_adv 1.33, BN momentum 0.9; every BN layer
    weighs the same: DeepInversion's first layer x10 cost Fast-10 ten points on Fashion-MNIST A); the
    student's SGD lr 0.2 with a cosine over the chain and T=20 too. `kd_steps` per unit and `warmup` (units
    made before the student and the adversarial term start) are scaled to dfkd's units (one batch each).
    """

    g_steps: int = setting(10, "generator steps per unit", low=1)
    lr_g: float = setting(2e-3, "Adam learning rate of the generator", low=0, low_open=True)
    w_bn: float = setting(10.0, "weight of the BN-statistics (or record) loss", low=0)
    w_oh: float = setting(0.5, "weight of cross-entropy to the class-balanced targets", low=0)
    w_adv: float = setting(1.33, "weight of the adversarial term (where student and teacher agree)", low=0)
    bn_momentum: float = setting(
        0.9, "blend of each batch's BN statistics with the chain's running ones", low=0, high=1, high_open=True)
    stat_layers: str = setting("", "layers of the statistics loss (default: all BN / recorded)")
    warmup: int = setting(2, "units made before the student and the adversarial term start", low=0)
    kd_steps: int = setting(
        400, "the papers' 400; on Fashion-MNIST A, Fast-10's proxy student 82.9% against 68.0% at 100", low=0)
    kd_batch_size: int = setting(256, "proxy student's batch, drawn from the memory bank", low=1)
    lr_s: float = setting(
        0.0, "proxy student's SGD learning rate (cosine over the chain); 0: 0.2 with BN, 0.02 without", low=0)
    weight_decay_s: float = setting(5e-4, "proxy student's weight decay", low=0)
    temperature: float = setting(20.0, "KD temperature of the proxy student", low=0, low_open=True)
    width: int = setting(64, "generator width", low=1)
    crop_pad: int = setting(
        -1, "random-crop padding of every view; -1: 1/8 of the side (the papers' 4 px at 32)", low=-1)
    checkpoint_every: int = setting(1, "units between chain checkpoints (a resume re-makes at most this many)", low=1)
    bank_ram_mb: int = setting(
        2048, "the memory bank is held in RAM up to this size, read back from the store beyond", low=0)


MIN_ALIVE_STEPS = 200  # proxy-student steps before a chain checks that its student learns (a few rounds of tiny test chains never do)


def student_lr(student: nn.Module) -> float:
    """The proxy student's default SGD rate: the papers' 0.2 for students with BatchNorm (their ResNets), 0.02
    without. Measured on Fashion-MNIST with BN-free LeNet-5-half students, 0.2 left 2 of 4 proxies at chance
    (B seed 0, A seed 2), 0.02 none of 4 (77-81%; BENCHMARKS.md)."""
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return 0.2 if any(isinstance(m, bn) for m in student.modules()) else 0.02


class BankMethod(Method):
    """One chain of batches over a range of units; subclasses make one batch (`make_batch`)."""

    trains_student = True
    sequential = True

    def __init__(self, ctx: SynthContext, config: BankConfig) -> None:
        super().__init__(ctx, config)
        if ctx.student is None:
            raise MethodError(f"{self.name} trains a proxy student on its memory bank; pass --student (a zoo name "
                              "such as lenet5_half, or a student checkpoint)")
        self.stats = StatTerms(ctx, config.stat_layers, self.name, momentum=config.bn_momentum)
        self.pad = max(1, ctx.image_shape[1] // 8) if config.crop_pad < 0 else config.crop_pad
        self.position = self.kd_done = 0
        self.chain_gen = torch.Generator()
        self.units: list[int] = []
        self.bank: MemoryBank | None = None
        self.state_path = ""
        self.lr_s = config.lr_s or student_lr(ctx.student)
        self.opt_s = make_optimizer(ctx.student.parameters(), "sgd", self.lr_s, config.weight_decay_s, nesterov=False)

    # -- what a subclass provides -------------------------------------------------------------------
    def init_chain(self, seed: int) -> None:
        """Build the chain's generator (and its optimizer) from `seed` alone."""
        raise NotImplementedError

    def make_batch(self, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """One batch in pixel space [0, 1] for these targets (the best iterate), plus its loss values."""
        raise NotImplementedError

    def generator_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_generator_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- the chain ---------------------------------------------------------------------------------
    def identity(self, units: list[int], seed: int) -> dict[str, Any]:
        """What a checkpoint of this chain must match to be continued."""
        return {**self.run_identity(), "units": [units[0], units[-1], len(units)] if units else [], "seed": seed}

    def begin_chain(self, store_path: str, state_path: str, units: list[int], done: np.ndarray, *, seed: int,
                    resume: bool, bank: tuple[str, ...] = ()) -> int:
        """Start this chain over `units`, or continue its checkpoint; returns how many units it has made.

        `bank`: stores of the same teacher whose images the memory bank starts from (a top-up: with a trained
        proxy student, the chain makes what that student has not learned yet; CMI's data reuse).

        A checkpoint is continued only when every unit it has made is still done in the store; otherwise (a
        damaged unit reopened, a store made again) the chain starts over from its seed and replays: units
        still done are made again but not rewritten, so exactly the missing ones are written.
        """
        c = self.config
        self.units, self.state_path = list(units), state_path
        self.bank = MemoryBank(store_path, ram_limit=c.bank_ram_mb << 20)
        banks = [self._preload(path) for path in bank]
        self.chain_gen.manual_seed(seed)
        self.init_chain(seed)
        continued = self._continue_generator(bank[0]) if bank else None
        self._identity = {**self.identity(self.units, seed), **({"bank": banks} if banks else {}),
                          **({"generator_from": continued} if continued else {})}
        if not resume:
            if fs.exists(state_path):
                fs.remove(state_path)  # another run's chain: never continued by this one
            return 0
        if not fs.exists(state_path):
            return 0
        try:
            st = fs.load_torch(state_path, map_location=self.ctx.device)
        except Exception as e:  # noqa: BLE001
            raise MethodError(f"cannot read the chain checkpoint {state_path} ({type(e).__name__}); delete it to "
                              "replay the chain from its start (units already written are kept)") from None
        check_same_run(st.get("identity"), self._identity, state_path,
                       "use the original settings, or --overwrite to start again")
        made = int(st["position"])
        if not all(done[u] for u in self.units[:made]):
            return 0
        self.load_generator_state(st["generator"])
        self.ctx.student.load_state_dict(st["student"])
        self.opt_s.load_state_dict(st["opt_s"])
        self.stats.running = {k: tuple(v) for k, v in st["stat_running"].items()}
        self.chain_gen.set_state(st["chain_gen"].cpu())
        self.position, self.kd_done = made, int(st["kd_done"])
        reader = self.bank._store()
        for u in self.units[:made]:
            self.bank.add(u, torch.from_numpy(reader.read_unit(u).images))
        return made

    def _continue_generator(self, bank: str) -> str | None:
        """A top-up continues the generator (and blended BN statistics) of the first bank store's finished chain
        when its checkpoint lies beside it: a fresh generator's first units are a chain's worst."""
        path = side_file(bank, "chain")
        if not fs.exists(path):
            return None
        try:
            st = fs.load_torch(path, map_location=self.ctx.device)
            if (st.get("identity") or {}).get("method") != self.name:
                raise ValueError(f"it is a {(st.get('identity') or {}).get('method')} chain")
            self.load_generator_state(st["generator"])
            self.stats.running = {k: tuple(v) for k, v in st["stat_running"].items()}
        except Exception as e:  # noqa: BLE001 - any misfit is the same problem for the user
            raise MethodError(f"the chain beside the bank store {bank} ({path}) cannot be continued by this {self.name} "
                              f"chain ({type(e).__name__}: {e}); use the bank's own settings, or move {path} away "
                              "to start a new generator") from None
        return path

    def _preload(self, path: str) -> dict[str, Any]:
        """Another store's finished images join the bank; refused unless it was made by this teacher at this shape."""
        from ... import store

        reader = store.open(path)
        m = reader.meta
        if m.provenance.get("teacher_fingerprint") != self.ctx.teacher_fingerprint:
            raise MethodError(f"the bank store {path} was not made by this teacher (its fingerprint differs); a top-up "
                              "starts from stores of the same teacher")
        if tuple(m.image_shape) != tuple(self.ctx.image_shape):
            raise MethodError(f"the bank store {path} holds {tuple(m.image_shape)} images, the teacher takes "
                              f"{tuple(self.ctx.image_shape)}")
        if not len(reader):
            raise MethodError(f"the bank store {path} has no finished images; finish it with --resume first")
        self.bank.preload(torch.from_numpy(reader.load_all().images), path)
        return reader.identity()

    def _save(self) -> None:
        fs.save_torch({"identity": self._identity, "position": self.position, "kd_done": self.kd_done,
                       "generator": self.generator_state(), "student": self.ctx.student.state_dict(),
                       "opt_s": self.opt_s.state_dict(), "chain_gen": self.chain_gen.get_state(),
                       "stat_running": {k: list(v) for k, v in self.stats.running.items()}}, self.state_path)

    def end_unit(self, unit: int, images: torch.Tensor) -> None:
        """The unit's stored images join the bank; the chain is checkpointed every `checkpoint_every` units."""
        self.bank.add(unit, images)
        if self.position % self.config.checkpoint_every == 0 or self.position == len(self.units):
            self._save()

    def synthesize(self, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The next unit of the chain: the proxy student learns from the bank, then the batch is made."""
        if self.bank is None:
            raise MethodError(f"{self.name}: the engine calls begin_chain() before the first unit")
        losses = {}
        if self.position >= self.config.warmup and len(self.bank) and self.config.kd_steps:
            losses["student"], agree = self.train_student()
            self._check_alive(losses["student"], agree)
        x01, made = self.make_batch(targets, gen)
        self.stats.update_momentum()
        self.position += 1
        return x01, {**made, **losses}

    @property
    def adversarial(self) -> bool:
        """The disagreement term is on once the warmup units are made (the student has learned something)."""
        return bool(self.config.w_adv) and self.position >= self.config.warmup

    def batch_loss(self, x01: torch.Tensor, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The weighted losses of one augmented view (random crop, flip) of a pixel-space batch."""
        c, ctx = self.config, self.ctx
        view = ctx.normalize(augment(x01, "flip-crop", gen, self.pad))
        with ctx.autocast():
            t = ctx.teacher(view)
            parts = {"bn": self.stats.loss(1.0, c.w_bn), "oh": c.w_oh * F.cross_entropy(t.float(), targets)}
            if self.adversarial:
                parts["adv"] = -c.w_adv * agreement_kl(ctx.student(view), t)
        return sum(parts.values()), parts

    def optimize(self, forward: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, targets: torch.Tensor,
                 gen: torch.Generator, after_backward: Callable[[], None] | None = None) -> tuple[torch.Tensor, dict]:
        """`g_steps` steps of `opt` on the batch `forward()` makes; returns the iterate of lowest total loss (the
        papers keep the batch's best) and the last step's loss values."""
        best, best_loss, parts = None, None, {}
        for _ in range(self.config.g_steps):
            x = forward()
            loss, parts = self.batch_loss(x, targets, gen)
            with torch.no_grad():  # selected on the device: no host sync per step
                score = loss.detach().float()
                if best is None:
                    best, best_loss = x.detach().clone(), score
                else:
                    best = torch.where(score < best_loss, x.detach(), best)
                    best_loss = torch.minimum(score, best_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
        return best, {k: float(v.detach()) for k, v in parts.items()}

    def _check_alive(self, loss: float, agree: float) -> None:
        """Stop the chain, before its next unit is written, once the proxy student has had a second round of
        training and still answers at chance: every later batch's adversarial term would be against a dead
        student (Fashion-MNIST A, BN-free LeNet-5-half at lr_s 0.2: 10.00% after the whole chain)."""
        chance = 1.0 / self.ctx.num_classes
        if math.isfinite(loss) and (self.kd_done < max(2 * self.config.kd_steps, MIN_ALIVE_STEPS)
                                    or agree > 1.5 * chance):
            return  # a non-finite loss stops the chain at once: its next batch would be made against NaN
        state = "is at chance" if math.isfinite(loss) else "diverged"
        raise MethodError(f"{self.name}: the proxy student {state} after {self.kd_done} steps of training "
                          f"(it agrees with the teacher on {agree:.0%} of a bank batch, chance "
                          f"{chance:.0%}; loss {loss:.3g}): its SGD rate lr_s={self.lr_s:g} is too high for it; rerun "
                          f"with --set lr_s={self.lr_s / 10:g} --overwrite (the units written so far are not worth keeping)")

    def train_student(self) -> tuple[float, float]:
        """kd_steps of the proxy student on the bank (augmented, the teacher's logits at T), cosine lr over the
        chain; returns the last step's loss and the student's agreement with the teacher on that batch."""
        c, ctx, student = self.config, self.ctx, self.ctx.student
        total = c.kd_steps * max(1, len(self.units) - c.warmup)
        with training(student):
            for _ in range(c.kd_steps):
                for group in self.opt_s.param_groups:
                    group["lr"] = 0.5 * self.lr_s * (1 + math.cos(math.pi * min(self.kd_done, total) / total))
                x = augment(self.bank.sample(c.kd_batch_size, self.chain_gen), "flip-crop", self.chain_gen, self.pad)
                x = ctx.normalize(x.to(ctx.device).float() / 255.0)
                with torch.no_grad(), ctx.autocast():
                    t = ctx.teacher(x)  # online, on the augmented view: the stored logits are of the plain image
                with ctx.autocast():
                    out = student(x)
                    loss = kl_divergence(out, t, c.temperature) * c.temperature ** 2
                self.opt_s.zero_grad(set_to_none=True)
                loss.backward()
                self.opt_s.step()
                self.kd_done += 1
        return float(loss.detach()), float((out.detach().argmax(1) == t.argmax(1)).float().mean())

    def close(self) -> None:
        self.stats.close()
