"""Pipeline files (TOML): sections as dataclasses, validated with errors that name file, section and key."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

from ..distill.models import ModelError, check_model_name, is_code_name
from ..store.toolbox.declared import base_type, setting
from ..store.toolbox.errors import DfkdError
from ..synth.methods import MethodError, list_methods, method_class, method_config

from .settings import DistillSettings, SettingError, SynthSettings, TeacherSettings


class PipelineError(DfkdError):
    """A pipeline file that cannot run as written."""


@dataclass
class RunSection:
    """[run]: where outputs go (relative to the current directory), seed, device, trusted model factories."""

    name: str = "pipeline"
    out: str = "runs/pipeline"
    seed: int = 0
    device: str = "auto"
    model_code: list[str] = field(default_factory=list)  # package.module:factory names a checkpoint may name


@dataclass
class DataSection:
    """[data]: the real dataset behind teacher training, the record, real-data KD and evaluation."""

    name: str = "digits"
    root: str = ""


@dataclass(kw_only=True)
class TeacherSection(TeacherSettings):
    """[teacher] (or several [[teacher]] with names): a checkpoint to use, or a model to train on [data] with
    `dfkd train-teacher`'s options as keys of the same names (TeacherSettings; `seed` defaults to [run].seed).

    `record = true` adds a `dfkd record` stage on [data]'s training split for this teacher (statistics
    and spectra of `record_layers`, default every conv/linear layer but the last).
    """

    name: str = "teacher"
    checkpoint: str = ""
    model: str = ""
    seed: int | None = setting(None, "Seed of initialization and data order; unset: [run].seed.")
    record: bool = False
    record_layers: list[str] = field(default_factory=list)
    record_per_class: bool = False


@dataclass(kw_only=True)
class SynthSection(SynthSettings):
    """[[synth]]: one store. method `real` stores real training images (real-data KD at the same count). The
    recipe keys are `dfkd synth`'s options of the same names (SynthSettings); `seed` defaults to [run].seed."""

    name: str
    method: str
    teacher: str = ""  # a [[teacher]] name; default: the first teacher
    num_images: int = 1024
    seed: int | None = setting(None, "Base seed: each unit's seed derives from it and the unit's index; unset: "
                               "[run].seed.")
    student: str = ""  # adi: a checkpoint or distill:<name>/<store>/<student>; adversarial/dafl: a zoo name
    stats: bool = False  # use the teacher's record (stat/spectral on teachers without BN; needs record = true)
    params: dict[str, Any] = field(default_factory=dict)
    bank: list[str] = field(default_factory=list)  # fast/nayer: [[synth]] names whose stores the memory bank starts from


@dataclass(kw_only=True)
class DistillSection(DistillSettings):
    """[[distill]]: students trained together from each listed store (default: every store). An entry "X+Y"
    trains on the union of stores X and Y, shuffled as one. The other keys are `dfkd distill`'s options
    (DistillSettings), of the same names; `teacher` names a [[teacher]], `seed` defaults to [run].seed."""

    name: str
    students: list[str]
    stores: list[str] = field(default_factory=list)
    seed: int | None = setting(None, "Seed of the students' initialization and the data order; unset: [run].seed.")


@dataclass
class Pipeline:
    """A whole job: teacher -> (record) -> synthesis stores -> distillation of students -> report."""

    path: str
    run: RunSection
    data: DataSection
    teachers: list[TeacherSection]
    synth: list[SynthSection]
    distill: list[DistillSection]

    @property
    def model_code(self) -> tuple[str, ...]:
        """The model factories this file names ([run] model_code, teachers, students): the only code a
        checkpoint of this pipeline may ask dfkd to import."""
        named = [*self.run.model_code, *(t.model for t in self.teachers), *(s.student for s in self.synth),
                 *(n for d in self.distill for n in d.students)]
        return tuple(n for n in named if is_code_name(n))


def _check_type(where: str, key: str, value: Any, hint: Any) -> Any:
    """Value as the field's type (ints accepted for floats), or a PipelineError naming the place."""
    hint, _ = base_type(hint)  # `float | None`: unset by leaving the key out
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise PipelineError(f"{where} key '{key}' must be a list of strings, got {value!r}")
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise PipelineError(f"{where} key '{key}' must be a table, e.g. {key} = {{ iterations = 200 }}")
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise PipelineError(f"{where} key '{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _section(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise PipelineError(f"{where} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PipelineError(f"{where} has no key '{unknown[0]}'; it takes {', '.join(fields)}")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and n not in raw]
    if missing:
        raise PipelineError(f"{where} needs key '{missing[0]}'")
    try:
        return cls(**{k: _check_type(where, k, v, hints[k]) for k, v in raw.items()})
    except SettingError as e:
        raise PipelineError(f"{where} key '{e.key}' {e.reason}") from None


PIPELINE_FILE_LIMIT = 1 << 20  # the shipped Fashion-MNIST pipeline, every method and setting, is 10 KB


def load_pipeline(path: str) -> Pipeline:
    """Parse and validate a pipeline file; every problem is one line naming file, section and key."""
    if not os.path.isfile(path):
        raise PipelineError(f"pipeline file {path} does not exist; see pipelines/demo.toml for an example")
    size = os.path.getsize(path)
    if size > PIPELINE_FILE_LIMIT:  # a sparse file of a few KB on disk read as 3 GB, and parsing took 6.6 GB
        raise PipelineError(f"{path} is {size:,} bytes; a pipeline file is a few KB of TOML: is it the right file?")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not valid TOML (not UTF-8 text: byte {e.object[e.start]:#04x} at {e.start})") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively: 50,000 '[' took it past the stack
        raise PipelineError(f"{path}: values nested too deeply to be a pipeline file") from None
    allowed = {"run", "data", "teacher", "synth", "distill"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise PipelineError(f"{path}: unknown section [{unknown[0]}]; sections are {', '.join(sorted(allowed))}")
    for key in ("synth", "distill"):
        if key in raw and not isinstance(raw[key], list):
            raise PipelineError(f"{path}: write [[{key}]] (an array of tables), not [{key}]")
    teachers = raw.get("teacher", {})
    teachers = [_section(TeacherSection, t, f"{path} [[teacher]] #{i + 1}") for i, t in enumerate(teachers)] \
        if isinstance(teachers, list) else [_section(TeacherSection, teachers, f"{path} [teacher]")]
    p = Pipeline(path, _section(RunSection, raw.get("run", {}), f"{path} [run]"),
                 _section(DataSection, raw.get("data", {}), f"{path} [data]"), teachers,
                 [_section(SynthSection, s, f"{path} [[synth]] #{i + 1}") for i, s in enumerate(raw.get("synth", []))],
                 [_section(DistillSection, d, f"{path} [[distill]] #{i + 1}")
                  for i, d in enumerate(raw.get("distill", []))])
    _validate(p)
    return p


def _validate(p: Pipeline) -> None:
    """Cross-section checks: names, methods and their options, students, references."""
    tnames = [t.name for t in p.teachers]
    if not p.teachers or len(set(tnames)) != len(tnames):
        raise PipelineError(f"{p.path}: give one [teacher], or [[teacher]] sections with unique names (got {tnames})")
    for i, t in enumerate(p.teachers):
        where = f"{p.path} [teacher]" if len(p.teachers) == 1 else f"{p.path} [[teacher]] #{i + 1} ({t.name})"
        _validate_teacher(t, where)
        names = [s.name for s in p.synth]
    if len(set(names)) != len(names):
        raise PipelineError(f"{p.path} [[synth]]: names must be unique, got {names}")
    for i, s in enumerate(p.synth):
        where = f"{p.path} [[synth]] #{i + 1} ({s.name})"
        _check_name(s.name, where)
        if s.teacher and s.teacher not in tnames:
            raise PipelineError(f"{where} key 'teacher': no teacher named {s.teacher!r}; teachers are {', '.join(tnames)}")
        teacher = next(t for t in p.teachers if t.name == (s.teacher or tnames[0]))
        for b in s.bank:
            if b not in names or b == s.name:
                raise PipelineError(f"{where} key 'bank': no other [[synth]] named {b!r}; names are {', '.join(names)}")
        if s.method == "real":
            continue
        if s.method not in list_methods():
            raise PipelineError(f"{where} key 'method': unknown method {s.method!r}; choose one of "
                                f"{', '.join(list_methods() + ['real'])}")
        try:
            method_config(s.method, s.params)
        except MethodError as e:
            raise PipelineError(f"{where} key 'params': {e}") from None
        if s.stats and not teacher.record:
            raise PipelineError(f"{where} key 'stats' needs record = true in teacher {teacher.name!r} "
                                "(the statistics come from its record)")
        generative = method_class(s.method).trains_student
        if generative and not s.params.get("generator"):
            if not s.student:
                raise PipelineError(f"{where} needs key 'student' (the proxy student {s.method} trains), "
                                    "e.g. student = \"lenet5_half\"")
            try:
                if not s.student.startswith("distill:"):  # a distilled student (a top-up) is checked by its stage
                    check_model_name(s.student)
            except ModelError as e:
                raise PipelineError(f"{where} key 'student': {e}") from None
        if s.method == "adi" and not s.student:
            raise PipelineError(f"{where} needs key 'student' (adi's competitor): a checkpoint, or "
                                "distill:<distill name>/<store name>/<student>")
    dnames = [d.name for d in p.distill]
    if len(set(dnames)) != len(dnames):
        raise PipelineError(f"{p.path} [[distill]]: names must be unique, got {dnames}")
    for i, d in enumerate(p.distill):
        where = f"{p.path} [[distill]] #{i + 1} ({d.name})"
        _check_name(d.name, where)
        if not d.students:
            raise PipelineError(f"{where} key 'students' must name at least one student")
        for s in d.students:
            try:
                check_model_name(s)
            except ModelError as e:
                raise PipelineError(f"{where} key 'students': {e}") from None
        for entry in d.stores:
            for s in entry.split("+"):
                if s not in names:
                    raise PipelineError(f"{where} key 'stores': no [[synth]] named {s!r}; names are {', '.join(names)}")
        if d.teacher is not None and d.teacher not in tnames:
            raise PipelineError(f"{where} key 'teacher': no teacher named {d.teacher!r}; teachers are {', '.join(tnames)}")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_name(name: str, where: str) -> None:
    """A section's name becomes a folder under [run].out: letters, digits, '_', '.', '-', not starting with a dot,
    so no name ('..', 'a/b', 'C:x') can reach outside it."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PipelineError(f"{where} key 'name' must be a plain word (letters, digits, '_', '.', '-', not starting "
                            f"with '.'), got {name!r}")


def _validate_teacher(t: TeacherSection, where: str) -> None:
    _check_name(t.name, where)
    if bool(t.checkpoint) == bool(t.model):
        raise PipelineError(f"{where} needs exactly one of 'checkpoint' (a teacher file) or 'model' (train one)")
    if t.checkpoint and not os.path.isfile(t.checkpoint):
        raise PipelineError(f"{where} key 'checkpoint': {t.checkpoint} does not exist; train one with `dfkd "
                            "train-teacher`, or give 'model' to have the pipeline train it")
    try:
        if t.model:
            check_model_name(t.model)
    except ModelError as e:
        raise PipelineError(f"{where} key 'model': {e}") from None
