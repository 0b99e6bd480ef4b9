"""Settings families declared once: a dataclass whose fields carry their help, choices and bounds, from which the
CLI options, the pipeline file's keys and the API's arguments are all made (no torch, so --help stays fast).

`setting(default, help, ...)` declares a field; `click_options(Settings)` gives a command its options (one per
field, `--batch-size` for `batch_size`); `check_settings(obj)` refuses a value outside its choices or bounds
with one line, for the API and for pipeline files alike (the CLI's click types refuse the same values).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ..store.schema import MAX_VIEWS
from ..store.toolbox.augment import MODES as AUGMENTATIONS
from ..store.toolbox.augment import VIEW_MODE_HELP, VIEW_MODES
from ..store.toolbox.compute import AMP_MODES, DISTILL_LR, OPTIMIZERS, TEACHER_LR
from ..store.toolbox.declared import check_declared, setting, setting_fields
from ..store.toolbox.errors import DfkdError

VIEWS_DEFAULT = 8  # view labels per image a new store keeps: the measured recipe (BENCHMARKS.md)
TEACHER_AUGMENTATIONS = ("auto", *AUGMENTATIONS)


class SettingError(DfkdError):
    """A setting outside its choices or bounds: `key` names it, `reason` says what it takes."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key} {reason}")
        self.key, self.reason = key, reason


def click_options(cls: type) -> Callable[[Callable], Callable]:
    """A decorator giving a click command one option per setting of `cls` (booleans: --x/--no-x)."""
    import click

    def option(f: dataclasses.Field, kind: Any) -> Callable:
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        text = m["cli_help"] or m["help"]
        if kind is bool:
            return click.option(f"{flag}/--no-{flag[2:]}", default=f.default, show_default=True, help=text)
        if m["choices"]:
            typ: Any = click.Choice(m["choices"])
        elif kind in (int, float) and (m["low"] is not None or m.get("high") is not None):
            typ = (click.IntRange if kind is int else click.FloatRange)(min=m["low"], min_open=m["low_open"],
                                                                        max=m.get("high"), max_open=m["high_open"])
        else:
            typ = kind
        return click.option(flag, type=typ, default=f.default, show_default=f.default is not None, help=text)

    def decorate(command: Callable) -> Callable:
        for f, kind, _ in reversed(setting_fields(cls)):
            command = option(f, kind)(command)
        return command
    return decorate


def settings_of(obj: Any, cls: type) -> dict[str, Any]:
    """The values of `cls`'s fields on `obj` (a pipeline section, say): the keyword arguments of a job."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}


def check_settings(obj: Any) -> None:
    """Refuse a setting outside its type, choices or bounds: one line naming it, its value and what it takes."""
    check_declared(obj, SettingError)


@dataclass(kw_only=True)
class DistillSettings:
    """How students are distilled: `dfkd distill`'s options, a [[distill]] section's keys, DistillJob's arguments."""

    teacher: str | None = setting(
        None, "A teacher online: it relabels every augmented view (instead of stored logits); in a pipeline file the "
        "name of a [[teacher]]", cli_help="Teacher checkpoint: online targets for augmented views, or for --kd-data.")
    max_images: int | None = setting(
        None, "Train on this many images of the store(s): whole units drawn with the seed, an equal share of each "
        "store (to compare a mixture with one store at an equal image count)", low=1)
    epochs: int = setting(
        300, "Passes over the store. A store of a few thousand synthetic images wants hundreds: on Fashion-MNIST a "
        "DeepInversion student gave 69.8% at 60 epochs, 77.1% at 300 (BENCHMARKS.md); the view-label figures are "
        "at 367.", low=1)
    batch_size: int = setting(256, "Images per step (per rank).", low=1)
    optimizer: str = setting(
        "sgd", "sgd (momentum 0.9, cosine) by default: on Fashion-MNIST view stores it beat Adam 1e-3 at T 4 by 6.5 "
        "points (82.07 vs 75.60%, BENCHMARKS.md).", choices=OPTIMIZERS)
    lr: float | None = setting(None, "Peak learning rate (cosine to 0); unset: 0.02 SGD, 1e-3 Adam.", low=0,
                               low_open=True)
    weight_decay: float = setting(5e-4, "L2 weight decay of every student.", low=0)
    temperature: float = setting(20.0, "KD temperature T (loss x T^2); 20 as in the Fast/CMI proxy students.", low=0,
                                 low_open=True)
    kd: float = setting(1.0, "Weight of the KL term.", low=0)
    ce_teacher: float = setting(0.0, "Weight of CE to the teacher's argmax.", low=0)
    clip_grad_norm: float = setting(
        10.0, "Scale each step's gradient down to this total norm when above it; 0: never. On Fashion-MNIST it kept "
        "a student from blowing up early (71.4 -> 80.1%) and cut the spread of 13 runs from 2.7 to 0.6 points "
        "(BENCHMARKS.md).", low=0)
    augment: str = setting(
        "none", "Label-preserving augmentation; stored logits are reused unless a teacher relabels the views.",
        choices=AUGMENTATIONS)
    views: bool = setting(
        True, "On a store with view labels (synth --views, store label) and no teacher: each epoch trains on one "
        "stored augmented view per image with the teacher's stored logits of it.")
    workers: int = setting(0, "DataLoader workers reading the store.", low=0)
    seed: int = setting(0, "Seed of the students' initialization and the data order.")
    amp: str = setting("auto", "Mixed precision on CUDA (auto: bf16 where supported, else fp16 + grad scaler); off "
                       "on CPU.", choices=AMP_MODES)
    compile: bool = setting(False, "torch.compile the students (CUDA; slow first steps).")
    cuda_graphs: bool = setting(
        False, "Replay each student's step (forward, loss, backward, optimizer) as one CUDA graph, so small students "
        "are not bound by the host's launches (CUDA, one process; not with fp16 or --compile).")

    @property
    def peak_lr(self) -> float:
        """The rate the students' cosine schedule starts from: `lr`, else the optimizer's measured default."""
        return self.lr if self.lr is not None else DISTILL_LR[self.optimizer]

    def __post_init__(self) -> None:
        check_settings(self)
        if self.kd == 0 and self.ce_teacher == 0:
            raise SettingError("kd", "and ce_teacher are both 0: the students would have nothing to learn; keep kd 1 "
                               "(the default) or give ce_teacher a weight")


@dataclass(kw_only=True)
class SynthSettings:
    """How a store is made, beyond its method, size and references: `dfkd synth`'s options, a [[synth]] section's
    keys, SynthJob's arguments."""

    batch_size: int = setting(256, "Images per batch = per write unit.", low=1)
    seed: int = setting(0, "Base seed: each unit's seed derives from it and the unit's index.")
    views: int = setting(
        VIEWS_DEFAULT, "Also store the teacher's logits of this many seeded augmented views of every image (view "
        "labels: students then learn from augmented views with no teacher; on a held-out DeepInversion store a "
        "student went from 80.4% without to 93.4% with 8). 0: none (`dfkd store label` adds them later).", low=0,
        high=MAX_VIEWS)
    view_mode: str = setting("flip-crop", VIEW_MODE_HELP, choices=VIEW_MODES)
    amp: str = setting("auto", "Mixed precision on CUDA (auto: bf16 where supported, else fp16); always off on CPU.",
                       choices=AMP_MODES)
    compile: bool = setting(False, "torch.compile the teacher (CUDA; slow first batch).")
    cuda_graphs: bool = setting(
        False, "Replay each inversion iteration (stat, deepinversion, adi, spectral) as one CUDA graph, captured once "
        "per batch shape: the host issues one launch per iteration instead of hundreds (CUDA; not with fp16).")
    units_in_flight: int = setting(
        1, "Inversion methods (stat, deepinversion, adi): optimize this many units side by side in one batch, each "
        "from its own seed and matched on its own statistics, so each gets the images it gets alone (to float "
        "rounding): fills a GPU that one unit leaves idle.", low=1, high=64)

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(kw_only=True)
class TeacherSettings:
    """How a teacher is trained on real data: `dfkd train-teacher`'s options, a [[teacher]] section's training keys,
    train_teacher()'s arguments."""

    epochs: int = setting(10, "Passes over the training split.", low=1)
    batch_size: int = setting(128, "Images per step.", low=1)
    optimizer: str = setting("sgd", "SGD with momentum 0.9, or Adam.", choices=OPTIMIZERS)
    lr: float | None = setting(None, "Peak learning rate (cosine to 0); unset: 0.05 SGD, 1e-3 Adam.", low=0,
                               low_open=True)
    weight_decay: float = setting(5e-4, "L2 weight decay.", low=0)
    augment: str = setting("auto", "auto: what suits the data (flips for clothes and objects, not for digits; crops "
                           "only for an image folder, where a mirror may change a label).",
                           choices=TEACHER_AUGMENTATIONS)
    seed: int = setting(0, "Seed of initialization and data order.")

    @property
    def peak_lr(self) -> float:
        """The rate the cosine schedule starts from: `lr`, else the optimizer's default."""
        return self.lr if self.lr is not None else TEACHER_LR[self.optimizer]

    def __post_init__(self) -> None:
        check_settings(self)
