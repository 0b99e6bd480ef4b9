"""The generator methods' shared engine; the families are adversarial.py (DFAD / ZSKT) and dafl.py (DAFL).

A generator G(z) is trained against the frozen teacher (and, for `adversarial`, a proxy student that
learns on G's samples); the engine then fills the store by sampling G per write unit, labelling each
image by the teacher's argmax. Training is one loop with a pluggable round, checkpointed every few
rounds beside the store (`<stem>.generator-train.pt`), so an interrupted run continues where it was;
the finished generator is saved as `<stem>.generator.pt`, and `generator=FILE` skips training.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ...store.toolbox import fs
from ...store.toolbox.compute import OPTIMIZERS, make_optimizer
from ...store.toolbox.declared import setting
from ...store.toolbox.identity import check_same_run
from ...store.toolbox.progress import progress

from ..generators import GeneratorError, GeneratorSpec, load_generator, load_snapshots, save_generator
from ..modes import training
from ..side_files import side_file
from .base import Method, MethodError, SynthContext
from .deepinversion import StatTerms


@dataclass
class GenerativeConfig:
    """Generator and training budget shared by the generator methods; `generator`: a saved file to reuse."""

    rounds: int = setting(2000, "generator training rounds (the budget)", low=1)
    batch_size: int = setting(512, "samples per training round", low=1)
    latent_dim: int = setting(100, "size of the generator's latent z", low=1)
    width: int = setting(64, "generator width (its channel counts scale with it)", low=1)
    arch: str = setting("dcgan", "generator architecture (registered name)")
    head: str = setting(
        "bn", "bn: the published tanh + non-affine BatchNorm in the teacher's input space; tanh: pixels")
    lr_g: float = setting(1e-3, "Adam learning rate of the generator", low=0, low_open=True)
    lr_s: float = setting(0.01, "learning rate of the proxy student", low=0, low_open=True)
    student_optimizer: str = setting("sgd", "proxy student's optimizer: sgd or adam", choices=OPTIMIZERS)
    weight_decay_s: float = setting(1e-4, "proxy student's weight decay", low=0)
    checkpoint_every: int = setting(50, "rounds between training checkpoints", low=1)
    generator: str = setting("", "a saved .generator.pt to fill the store from, skipping training")
    # Feature-statistics prior on G's samples (DFQ, Choi et al. 2020: DFAD + BN statistics): the teacher's BN
    # running statistics, or a record's (--stats) for teachers without BN; 0 = the published method alone.
    w_stat: float = setting(0.0, "weight of the feature-statistics prior on G's samples (0: off)", low=0)
    stat_layers: str = setting("", "layers of the prior (default: every BN / recorded layer)")
    first_multiplier: float = setting(1.0, "extra weight of the prior's first layer", low=0)
    # Fill the store from this many generators taken evenly along training (the last is the final one), each
    # making an equal share of every write unit. 1: the final generator only (published). The proxy student
    # learned from the whole trajectory of a moving generator; a store of the final one holds less variety.
    snapshots: int = setting(1, "generators along training that fill the store (1: the final one)", low=1)


class GenerativeMethod(Method):
    """Trains G (in `prepare`), then makes images by sampling it; subclasses define one training round."""

    labels_from_teacher = True
    trains_student = True
    trains_before_sampling = True
    saves_generator = True

    def __init__(self, ctx: SynthContext, config: GenerativeConfig) -> None:
        super().__init__(ctx, config)
        if ctx.student is None and not config.generator:
            raise MethodError(f"{self.name} trains a proxy student beside its generator; pass --student "
                              "(a zoo name such as lenet5_half, or a student checkpoint)")
        if config.snapshots < 1 or (not config.generator and config.snapshots > config.rounds):
            raise MethodError(f"{self.name}.snapshots must lie in [1, rounds={config.rounds}], got {config.snapshots}")
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
            self.opt_s = make_optimizer(params, c.student_optimizer, c.lr_s, c.weight_decay_s, nesterov=False)

    def train_round(self, z_gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One round of the method's min-max (or max) game; returns its losses (detached, on the device)."""
        raise NotImplementedError

    def stat_prior(self) -> torch.Tensor | float:
        """w_stat x the feature-statistics loss of the teacher's last forward (0 when the prior is off)."""
        if self.stats is None:
            return 0.0
        return self.stats.loss(self.config.first_multiplier, self.config.w_stat)

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

    def _state(self, z_gen: torch.Generator) -> dict[str, Any]:
        s = self.ctx.student
        return {"identity": self.run_identity(), "rounds_done": self.rounds_done, "z_gen": z_gen.get_state(),
                "generator": self.generator_model.state_dict(), "opt_g": self.opt_g.state_dict(),
                "student": None if s is None else s.state_dict(),
                "opt_s": None if self.opt_s is None else self.opt_s.state_dict(), "snapshots": self.snapshot_states}

    def _load_state(self, path: str, z_gen: torch.Generator) -> None:
        try:
            st = fs.load_torch(path, map_location=self.ctx.device)
        except Exception as e:  # noqa: BLE001
            raise MethodError(f"cannot read the training checkpoint {path} ({type(e).__name__}); delete it to "
                              "start the generator training again") from None
        check_same_run(st.get("identity"), self.run_identity(), path, "use the original settings, or --overwrite to "
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

    def prepare(self, store_path: str, *, resume: bool = False, seed: int = 0, show: bool | None = None) -> bool:
        """Train the generator (continuing a checkpoint when resuming) and save it beside the store (synth/side_files.py).

        Returns whether this run wrote the generator: False when a resume found training finished and its
        file in place (then nothing is rewritten, and the proxy student must not be either).
        """
        if self.trained:
            return False
        c, student = self.config, self.ctx.student
        state_path = side_file(store_path, "generator-train")
        snap_rounds = {-(-k * c.rounds // c.snapshots) for k in range(1, c.snapshots)}  # ceil(k R / S), final excluded
        z_gen = torch.Generator().manual_seed(seed)
        self.setup()
        if resume and fs.exists(state_path):
            self._load_state(state_path, z_gen)
        rounds_before = self.rounds_done
        self.generator_model.train()
        try:
            with training(student):
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
            self.close()  # training hooks (the prior, DAFL features, ZSKT attention) leave the teacher before the fill
        self.trained = True
        path = side_file(store_path, "generator")
        if resume and self.rounds_done == rounds_before and fs.exists(path):
            return False  # finished before this run: the file there is this generator's
        save_generator(path, self.generator_model, self.spec,
                       {"method": self.name, "teacher_fingerprint": self.ctx.teacher_fingerprint,
                        "rounds": self.rounds_done, "config": asdict(c)}, snapshots=self.snapshot_states)
        return True

    def load_trained(self, store_path: str) -> None:
        """Take the generator another process trained for this store (its side file)."""
        path = side_file(store_path, "generator")
        g, spec, _ = load_generator(path)
        if spec != self.spec:
            raise GeneratorError(f"{path} is a {spec}, this run builds a {self.spec}")
        self.generator_model.load_state_dict(g.state_dict())
        self.snapshot_states = load_snapshots(path)
        self.trained = True

    # -- filling the store -----------------------------------------------------------------------
    @torch.no_grad()
    def synthesize(self, targets: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Samples of the trained generator (equal shares from each snapshot), one write unit per batch.

        The generator's BN layers normalize with each batch's own statistics, as every sample the proxy
        student learned from was made (on a copy, so the saved generator's running statistics stay); eval
        mode, where each image depends on its own z only, gives one grey image for every z of a DAFL
        generator on Fashion-MNIST (BENCHMARKS.md).
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
