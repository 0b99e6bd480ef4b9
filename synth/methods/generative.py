"""Generator methods: adversarial distillation (DFAD / ZSKT) and DAFL.

A generator G(z) is trained against the frozen teacher (and, for `adversarial`, a proxy student that
learns on G's samples); the engine then fills the store by sampling G per write unit, labelling each
image by the teacher's argmax. Training is one loop with a pluggable round, checkpointed every few
rounds beside the store (`<stem>.generator-train.pt`), so an interrupted run continues where it was;
the finished generator is saved as `<stem>.generator.pt`, and `generator=FILE` skips training.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.store.progress import progress
from dfkd.store import fs
from dfkd.store.identity import check_same_run

from ..generators import GeneratorError, GeneratorSpec, load_generator, load_snapshots, save_generator
from ..hooks import FeatureHooks
from .base import Method, MethodError, SynthContext, register_method
from .feature_stats import StatTerms


@dataclass
class GenerativeConfig:
    """Generator and training budget shared by the generator methods; `generator`: a saved file to reuse."""

    rounds: int = 2000
    batch_size: int = 512
    latent_dim: int = 100
    width: int = 64
    arch: str = "dcgan"
    head: str = "bn"  # bn: the published tanh + non-affine BatchNorm in the teacher's input space; tanh: pixels
    lr_g: float = 1e-3
    lr_s: float = 0.01
    student_optimizer: str = "sgd"
    weight_decay_s: float = 1e-4
    checkpoint_every: int = 50
    generator: str = ""
    # Feature-statistics prior on G's samples (DFQ, Choi et al. 2020: DFAD + BN statistics): the teacher's BN
    # running statistics, or a record's (--stats) for teachers without BN; 0 = the published method alone.
    w_stat: float = 0.0
    stat_layers: str = ""
    first_multiplier: float = 1.0
    # Fill the store from this many generators taken evenly along training (the last is the final one), each
    # making an equal share of every write unit. 1: the final generator only (published). The proxy student
    # learned from the whole trajectory of a moving generator; a store of the final one holds less variety.
    snapshots: int = 1


def artifact_prefix(store_path: str) -> str:
    """Where a store's generator files go: the store path without its extension."""
    return os.path.splitext(os.fspath(store_path).rstrip("/"))[0]


class GenerativeMethod(Method):
    """Trains G (in `prepare`), then makes images by sampling it; subclasses define one training round."""

    labels_from_teacher = True
    needs_student = True
    trains_student = True

    def __init__(self, ctx: SynthContext, config: GenerativeConfig) -> None:
        super().__init__(ctx, config)
        if self.needs_student and ctx.student is None and not config.generator:
            raise MethodError(f"{self.name} trains a proxy student beside its generator; pass --student "
                              "(a zoo name such as lenet5_half, or a student checkpoint)")
        if config.snapshots < 1 or (not config.generator and config.snapshots > config.rounds):
            raise MethodError(f"{self.name}.snapshots must lie in [1, rounds={config.rounds}], got {config.snapshots}")
        if config.student_optimizer not in ("sgd", "adam"):
            raise MethodError(f"{self.name}.student_optimizer must be sgd or adam, got {config.student_optimizer!r}")
        self.spec = GeneratorSpec(config.arch, config.latent_dim, tuple(ctx.image_shape), config.width, config.head)
        if config.generator:
            g, spec, _ = load_generator(config.generator)
            if spec.latent_dim != config.latent_dim:
                raise GeneratorError(f"{config.generator} takes latent vectors of size {spec.latent_dim}, but "
                                     f"latent_dim is {config.latent_dim}; drop --set latent_dim or set it to {spec.latent_dim}")
            if tuple(spec.image_shape) != tuple(ctx.image_shape):
                raise GeneratorError(f"{config.generator} makes {tuple(spec.image_shape)} images but the teacher "
                                     f"takes {tuple(ctx.image_shape)}; use a generator trained for this teacher")
            self.spec, self.generator_model, self.trained = spec, g, True
            self.snapshot_states = load_snapshots(config.generator)  # the file decides, not config.snapshots
        else:
            self.generator_model, self.trained = self.spec.build(), False
            self.snapshot_states: list[dict[str, torch.Tensor]] = []  # taken along training, final one excluded
        # NHWC convolutions: 2.5x faster for this generator on CPU as well as on GPUs (measured, width 16, b256)
        self.generator_model.to(ctx.device, memory_format=torch.channels_last)
        self.rounds_done = 0
        self._samplers: list[nn.Module] = []  # one per snapshot + the final generator, made on first use
        self.stats: StatTerms | None = None
        if config.w_stat and not config.generator:  # built now so a teacher it cannot serve fails before training
            self.stats = StatTerms(ctx, config.stat_layers, self.name)

    # -- training ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Optimizers (and hooks) for training; called once before the first round."""
        c, g = self.config, self.generator_model
        self.opt_g = torch.optim.Adam(g.parameters(), lr=c.lr_g)
        self.opt_s = None
        if self.ctx.student is not None:
            params = self.ctx.student.parameters()
            self.opt_s = (torch.optim.SGD(params, lr=c.lr_s, momentum=0.9, weight_decay=c.weight_decay_s)
                          if c.student_optimizer == "sgd" else
                          torch.optim.Adam(params, lr=c.lr_s, weight_decay=c.weight_decay_s))

    def train_round(self, z_gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One round of the method's min-max (or max) game; returns its losses (detached, on the device)."""
        raise NotImplementedError

    def stat_prior(self) -> torch.Tensor | float:
        """w_stat x the feature-statistics loss of the teacher's last forward (0 when the prior is off)."""
        if self.stats is None:
            return 0.0
        return self.config.w_stat * self.stats.loss(self.config.first_multiplier)

    def close(self) -> None:
        """Remove the prior's hooks from the teacher (training's end, or the engine's close)."""
        if self.stats is not None:
            self.stats.close()
            self.stats = None

    def sample_z(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Latent vectors drawn on the CPU (the same on every device), moved to the device."""
        return torch.randn((n, self.config.latent_dim), generator=gen).to(self.ctx.device)

    def images(self, z: torch.Tensor) -> torch.Tensor:
        """G(z) in the teacher's input space, unclipped, as the published methods train on it."""
        out = self.generator_model(z)
        return out if self.generator_model.output_space == "input" else self.ctx.normalize(out)

    def _identity(self) -> dict[str, Any]:
        student = self.ctx.student
        return {"method": self.name, "config": asdict(self.config), "teacher": self.ctx.teacher_fingerprint,
                "compute": {"device": self.ctx.device.type, "amp": str(self.ctx.amp)},
                "student": None if student is None else [list(v.shape) for v in student.state_dict().values()]}

    def _state(self, z_gen: torch.Generator) -> dict[str, Any]:
        s = self.ctx.student
        return {"identity": self._identity(), "rounds_done": self.rounds_done, "z_gen": z_gen.get_state(),
                "generator": self.generator_model.state_dict(), "opt_g": self.opt_g.state_dict(),
                "student": None if s is None else s.state_dict(),
                "opt_s": None if self.opt_s is None else self.opt_s.state_dict(), "snapshots": self.snapshot_states}

    def _load_state(self, path: str, z_gen: torch.Generator) -> None:
        try:
            st = fs.load_torch(path, map_location=self.ctx.device)
        except Exception as e:  # noqa: BLE001
            raise MethodError(f"cannot read the training checkpoint {path} ({type(e).__name__}); delete it to "
                              "start the generator training again") from None
        check_same_run(st.get("identity"), self._identity(), path, "use the original settings, or --overwrite to "
                       "start again")
        self.generator_model.load_state_dict(st["generator"])
        self.opt_g.load_state_dict(st["opt_g"])
        if self.ctx.student is not None:
            self.ctx.student.load_state_dict(st["student"])
            self.opt_s.load_state_dict(st["opt_s"])
        z_gen.set_state(st["z_gen"].cpu())
        self.snapshot_states = list(st.get("snapshots", []))
        self.rounds_done = int(st["rounds_done"])

    def _save_state(self, path: str, z_gen: torch.Generator) -> None:
        fs.save_torch(self._state(z_gen), path)

    def prepare(self, prefix: str, *, resume: bool = False, seed: int = 0, show: bool | None = None) -> bool:
        """Train the generator (continuing a checkpoint when resuming) and save it as `<prefix>.generator.pt`.

        Returns whether this run wrote the generator: False when a resume found training finished and its
        file in place (then nothing is rewritten, and the proxy student must not be either).
        """
        if self.trained:
            return False
        c, student = self.config, self.ctx.student
        state_path = f"{prefix}.generator-train.pt"
        snap_rounds = {-(-k * c.rounds // c.snapshots) for k in range(1, c.snapshots)}  # ceil(k R / S), final excluded
        z_gen = torch.Generator().manual_seed(seed)
        self.setup()
        if resume and fs.exists(state_path):
            self._load_state(state_path, z_gen)
        rounds_before = self.rounds_done
        trainable = [p for p in (student.parameters() if student is not None else [])]
        flags = [p.requires_grad for p in trainable]
        self.generator_model.train()
        if student is not None:
            student.train()
            for p in trainable:
                p.requires_grad_(True)
        try:
            bar = progress(range(self.rounds_done, c.rounds), initial=self.rounds_done, total=c.rounds,
                           desc=f"{self.name}: training the generator", unit="round", show=show)
            for i in bar:
                losses = self.train_round(z_gen)
                self.rounds_done = i + 1
                if self.rounds_done in snap_rounds:
                    self.snapshot_states.append({k: v.detach().cpu().clone()
                                                 for k, v in self.generator_model.state_dict().items()})
                if self.rounds_done % c.checkpoint_every == 0 or self.rounds_done == c.rounds:
                    self._save_state(state_path, z_gen)
                    bar.set_postfix({k: f"{float(v):.3g}" for k, v in losses.items()})
            if not fs.exists(state_path):  # zero rounds asked: still leave a consistent state
                self._save_state(state_path, z_gen)
        finally:
            for p, f in zip(trainable, flags):
                p.requires_grad_(f)
            if student is not None:
                student.eval()
            self.close()  # training hooks (the prior, DAFL features, ZSKT attention) leave the teacher before the fill
        self.trained = True
        path = f"{prefix}.generator.pt"
        if resume and self.rounds_done == rounds_before and fs.exists(path):
            return False  # finished before this run: the file there is this generator's
        save_generator(path, self.generator_model, self.spec,
                       {"method": self.name, "teacher_fingerprint": self.ctx.teacher_fingerprint,
                        "rounds": self.rounds_done, "config": asdict(c)}, snapshots=self.snapshot_states)
        return True

    def load_trained(self, prefix: str) -> None:
        """Take the generator another process trained for this store (`<prefix>.generator.pt`)."""
        g, spec, _ = load_generator(f"{prefix}.generator.pt")
        if spec != self.spec:
            raise GeneratorError(f"{prefix}.generator.pt is a {spec}, this run builds a {self.spec}")
        self.generator_model.load_state_dict(g.state_dict())
        self.snapshot_states = load_snapshots(f"{prefix}.generator.pt")
        self.trained = True

    # -- filling the store -----------------------------------------------------------------------
    @torch.no_grad()
    def synthesize(self, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Samples of the trained generator (equal shares from each snapshot), one write unit per batch.

        The generator's BN layers normalize with each batch's own statistics, as every sample the proxy
        student learned from was made (on a copy, so the saved generator's running statistics stay); eval
        mode, where each image depends on its own z only, gave one grey image for every z of a DAFL
        generator on Fashion-MNIST (BENCHMARKS.md) and was removed.
        """
        if not self.trained:
            raise MethodError(f"{self.name}: the generator is not trained; the engine calls prepare() first")
        if not self._samplers:  # copies, so the saved generator (and its running statistics) stay as they are
            for state in [*self.snapshot_states, None]:
                g = copy.deepcopy(self.generator_model)
                if state is not None:
                    g.load_state_dict(state)
                self._samplers.append(g.train())
        z = self.sample_z(len(targets), gen)
        out = torch.cat([g(part) for g, part in zip(self._samplers, z.tensor_split(len(self._samplers)))
                         if len(part)])
        if self.generator_model.output_space == "input":  # clipped to valid pixels; logits follow the stored image
            out = self.ctx.denormalize(out).clamp(0, 1)
        return out, {}


# -- discrepancies ---------------------------------------------------------------------------------
def attention(f: torch.Tensor) -> torch.Tensor:
    """Attention map of a feature map (Zagoruyko & Komodakis): channel-mean of squares, flattened, unit norm."""
    return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at temperature T, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits.float() / temperature, 1),
                    F.softmax(teacher_logits.float() / temperature, 1), reduction="batchmean")


@dataclass
class AdversarialConfig(GenerativeConfig):
    """DFAD (Fang et al. 2019; MNIST code defaults): L1 on logits, 5 student steps per generator step.

    `discrepancy=kl` with `w_at` > 0 and `at_layers` ("teacher.path:student.path,...") is ZSKT's
    (Micaelli & Storkey 2019) KL + attention transfer (their β = 250); the generator maximizes the KL.
    """

    student_steps: int = 5
    discrepancy: str = "l1"
    w_at: float = 0.0
    at_layers: str = ""


@register_method
class Adversarial(GenerativeMethod):
    name = "adversarial"
    Config = AdversarialConfig

    def __init__(self, ctx: SynthContext, config: AdversarialConfig) -> None:
        if config.discrepancy not in ("l1", "kl"):
            raise MethodError(f"adversarial.discrepancy must be l1 (DFAD) or kl (ZSKT), got {config.discrepancy!r}")
        pairs = [p.split(":") for p in config.at_layers.split(",") if p.strip()]
        if config.w_at and (not pairs or any(len(p) != 2 for p in pairs)):
            raise MethodError("adversarial.w_at needs at_layers as teacher.path:student.path pairs, comma-separated")
        super().__init__(ctx, config)
        self.pairs = [(t.strip(), s.strip()) for t, s in pairs] if config.w_at else []
        self.t_hooks = self.s_hooks = None

    def setup(self) -> None:
        super().setup()
        if self.pairs:
            self.t_hooks = FeatureHooks(self.ctx.teacher, [t for t, _ in self.pairs], capture="output").__enter__()
            self.s_hooks = FeatureHooks(self.ctx.student, [s for _, s in self.pairs], capture="output").__enter__()

    def discrepancy(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        if self.config.discrepancy == "l1":
            return F.l1_loss(s_logits.float(), t_logits.float())
        return kl_divergence(s_logits, t_logits)

    def at_loss(self) -> torch.Tensor:
        return sum((attention(self.s_hooks.captured[s]) - attention(self.t_hooks.captured[t].detach())).pow(2).mean()
                   for t, s in self.pairs)

    def student_step(self, z: torch.Tensor) -> torch.Tensor:
        """The student learns to agree with the teacher on G(z) (G and teacher without gradients)."""
        with torch.no_grad():
            x = self.images(z)
            t = self.ctx.teacher(x)
        loss = self.discrepancy(self.ctx.student(x), t)
        if self.pairs:
            loss = loss + self.config.w_at * self.at_loss()
        self.opt_s.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_s.step()
        return loss.detach()

    def generator_step(self, z: torch.Tensor) -> torch.Tensor:
        """G moves toward samples where they disagree; gradients flow to G only (no teacher/student weights)."""
        params = [p for p in self.ctx.student.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            x = self.images(z)
            loss = -self.discrepancy(self.ctx.student(x), self.ctx.teacher(x)) + self.stat_prior()
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_g.step()
        finally:
            for p in params:
                p.requires_grad_(True)
        return loss.detach()

    def train_round(self, z_gen: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.config
        for _ in range(c.student_steps):
            loss_s = self.student_step(self.sample_z(c.batch_size, z_gen))
        loss_g = self.generator_step(self.sample_z(c.batch_size, z_gen))
        return {"student": loss_s, "generator": loss_g}

    def close(self) -> None:
        super().close()
        for h in (self.t_hooks, self.s_hooks):
            if h is not None:
                h.remove()


@dataclass
class DAFLConfig(GenerativeConfig):
    """DAFL (Chen et al. 2019; MNIST code defaults): one-hot + information entropy + activation losses.

    The student learns by KL (T=1) on the same samples each iteration; `feature_layer` is the teacher
    layer whose input is the "activation" (default: the last Linear, i.e. the penultimate features).
    """

    rounds: int = 24000
    lr_g: float = 0.2
    lr_s: float = 2e-3
    student_optimizer: str = "adam"
    weight_decay_s: float = 0.0
    w_onehot: float = 1.0
    w_entropy: float = 5.0
    w_activation: float = 0.1
    feature_layer: str = ""


@register_method
class DAFL(GenerativeMethod):
    name = "dafl"
    Config = DAFLConfig

    def __init__(self, ctx: SynthContext, config: DAFLConfig) -> None:
        layer = config.feature_layer or next((n for n, m in reversed(list(ctx.teacher.named_modules()))
                                             if isinstance(m, nn.Linear)), "")
        if not layer:
            raise MethodError("dafl needs the teacher's penultimate features and found no Linear layer; "
                              "name one with --set feature_layer=PATH (its input is used)")
        super().__init__(ctx, config)
        self.feature_layer, self.hooks = layer, None

    def setup(self) -> None:
        super().setup()
        self.hooks = FeatureHooks(self.ctx.teacher, [self.feature_layer], capture="input").__enter__()

    def train_round(self, z_gen: torch.Generator) -> dict[str, torch.Tensor]:
        c, teacher, student = self.config, self.ctx.teacher, self.ctx.student
        x = self.images(self.sample_z(c.batch_size, z_gen))
        t = teacher(x).float()
        feats = self.hooks.captured[self.feature_layer]
        onehot = F.cross_entropy(t, t.argmax(1))
        mean_p = F.softmax(t, 1).mean(0)
        entropy = (mean_p * torch.log10(mean_p.clamp_min(1e-12))).sum()  # negative entropy of the batch's classes
        activation = -feats.float().abs().mean()
        loss_g = c.w_onehot * onehot + c.w_entropy * entropy + c.w_activation * activation + self.stat_prior()
        loss_s = kl_divergence(student(x.detach()), t.detach())
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_s.zero_grad(set_to_none=True)
        (loss_g + loss_s).backward()
        self.opt_g.step()
        self.opt_s.step()
        return {"generator": loss_g.detach(), "student": loss_s.detach()}

    def close(self) -> None:
        super().close()
        if self.hooks is not None:
            self.hooks.remove()
