"""`dfkd run`: a pipeline's stages in dependency order, each reused when its output exists with the same
fingerprint (the teacher's weights hash + the stage's configuration + its inputs' fingerprints),
resumed when it was interrupted, and a report at the end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..store.toolbox import fs
from ..store.toolbox.identity import digest
from ..distill.checkpoint import load_model
from ..distill.evaluate import accuracy
from ..synth.methods import method_config

from .real_data import RealData, load_data
from .jobs import (DistillJob, SynthJob, at_chance_warning, fill_real_store, make_record, run_distill, run_synth,
                   train_teacher)
from .run_report import write_report
from .settings import DistillSettings, SynthSettings, TeacherSettings, settings_of
from .spec import Pipeline, PipelineError


# What a setting added since stores were first made meant before it existed, where that is not its default today:
# a store made before `views` had none, so a section without the key (views 8 now) is another store than those.
_BEFORE = {"views": 0}


def _fields(section: Any, added: tuple[str, ...]) -> dict[str, Any]:
    """A section's settings for its fingerprint; fields added since stores were made count only when they differ
    from what stores had before them, so an existing stage keeps its fingerprint (and its output) until it would
    come out different."""
    defaults = {f.name: _BEFORE.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(section) if f.name in added}
    return {k: v for k, v in dataclasses.asdict(section).items() if not (k in defaults and v == defaults[k])}


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Stage:
    """One unit of work: its key, the stages it needs, its configuration, and how to run it."""

    key: str
    deps: list[str]
    config: dict[str, Any]
    run: Callable[[bool, bool], dict[str, Any]]  # (resume, overwrite) -> result
    outputs: Callable[[], list[str]]
    teacher: str = ""  # the teacher whose weights hash enters the fingerprint
    result: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Plans and runs the stages of one pipeline file; state files live in <out>/stages/."""

    def __init__(self, pipeline: Pipeline, echo: Callable[[str], None] = print, progress: bool | None = None) -> None:
        self.p, self.echo, self.progress = pipeline, echo, progress
        self.out = pipeline.run.out
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if pipeline.run.device == "auto" \
            else pipeline.run.device
        self._data: RealData | None = None
        self.fingerprints: dict[str, str] = {}
        self.stages = self._plan()

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def data(self) -> RealData:
        if self._data is None:
            self._data = load_data(self.p.data.name, self.p.data.root or None)
        return self._data

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def teacher(self, name: str = "") -> Any:
        """A teacher section by name (default: the first)."""
        return next(t for t in self.p.teachers if t.name == (name or self.p.teachers[0].name))

    def teacher_path(self, name: str = "") -> str:
        t = self.teacher(name)
        return t.checkpoint or self.path(f"{t.name}.pt")

    def record_path(self, name: str = "") -> str:
        return self.path(f"{self.teacher(name).name}.record.safetensors")

    @staticmethod
    def teacher_key(name: str) -> str:
        return "teacher" if name == "teacher" else f"teacher:{name}"

    @staticmethod
    def record_key(name: str) -> str:
        return "record" if name == "teacher" else f"record:{name}"

    def store_path(self, name: str) -> str:
        return self.path("stores", f"{name}.zarr")

    def _state_file(self, key: str) -> str:
        return self.path("stages", key.replace(":", "--").replace("/", "__") + ".json")

    def read_state(self, key: str) -> dict[str, Any]:
        try:
            with open(self._state_file(key)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _write_state(self, key: str, state: dict[str, Any]) -> None:
        fs.write_text_atomic(self._state_file(key), json.dumps(state, indent=1, default=str))

    # -- the plan ----------------------------------------------------------------------------------
    def _plan(self) -> list[Stage]:
        p, stages = self.p, []
        for t in p.teachers:
            tconf = ({"checkpoint": os.path.abspath(t.checkpoint)} if t.checkpoint else
                     {**dataclasses.asdict(t), "record": None, "record_layers": None, "record_per_class": None,
                      "data": dataclasses.asdict(p.data), "seed": self.section_seed(t),
                      "lr": 0.0 if t.lr is None else t.lr})  # unset fingerprints as 0.0, its value in older run files, so their stages stay done
            stages.append(Stage(self.teacher_key(t.name), [], tconf, self._teacher_runner(t.name),
                                (lambda n=t.name: [self.teacher_path(n)]), teacher=t.name))
            if t.record:
                stages.append(Stage(self.record_key(t.name), [self.teacher_key(t.name)],
                                    {"layers": t.record_layers, "per_class": t.record_per_class, "data": p.data.name},
                                    self._record_runner(t.name), (lambda n=t.name: [self.record_path(n)]),
                                    teacher=t.name))
        for s in p.synth:
            tname = s.teacher or p.teachers[0].name
            deps = [self.teacher_key(tname)] + ([self.record_key(tname)] if s.stats else [])
            if s.student.startswith("distill:"):
                d, _, rest = s.student[len("distill:"):].partition("/")
                deps.append(f"distill:{d}/{rest.rpartition('/')[0]}")
            deps += [f"synth:{b}" for b in s.bank]
            conf = {**_fields(s, added=("views", "view_mode", "bank", "amp", "compile", "cuda_graphs",
                                        "units_in_flight")), "seed": self.section_seed(s),
                    # resolved defaults too: a new library default re-runs the store
                    "method_config": None if s.method == "real" else
                    dataclasses.asdict(method_config(s.method, s.params))}
            stages.append(Stage(f"synth:{s.name}", deps, conf, self._synth_runner(s),
                                (lambda n=s.name: [self.store_path(n)]), teacher=tname))
        for d in p.distill:
            for name in d.stores or [s.name for s in p.synth]:
                key = f"distill:{d.name}/{name}"
                conf = {**_fields(d, added=("max_images", "teacher", "kd", "workers", "amp", "compile", "cuda_graphs")),
                        "stores": None, "seed": self.section_seed(d), "eval": p.data.name,
                        "lr": 0.0 if d.lr is None else d.lr}  # unset fingerprints as 0.0, its value in older run files, so their stages stay done
                if d.teacher is not None:
                    conf["teacher"] = self.teacher_key(d.teacher)  # the teacher stage's fingerprint covers its file
                deps = [f"synth:{part}" for part in name.split("+")] + ([self.teacher_key(d.teacher)] if d.teacher else [])
                stages.append(Stage(key, deps, conf, self._distill_runner(d, name),
                                    (lambda k=key: [self.path("distill", k[len("distill:"):], "metrics.json")])))
        keys = {s.key for s in stages}
        for s in stages:
            for dep in s.deps:
                if dep not in keys:
                    raise PipelineError(f"{self.p.path}: stage {s.key} needs {dep}, which the file does not define "
                                        "(check the student reference distill:<distill>/<store>/<student>)")
        return self._ordered(stages)

    def _ordered(self, stages: list[Stage]) -> list[Stage]:
        """Dependency order, otherwise file order; a cycle is an error."""
        done: set[str] = set()
        order, left = [], list(stages)
        while left:
            ready = next((s for s in left if all(d in done for d in s.deps)), None)
            if ready is None:
                raise PipelineError(f"{self.p.path}: stages {', '.join(s.key for s in left)} depend on each other")
            order.append(ready)
            done.add(ready.key)
            left.remove(ready)
        return order

    def fingerprint(self, stage: Stage) -> str | None:
        """The stage's identity: its config and its inputs' fingerprints (the teacher's: its weights hash)."""
        if stage.key.startswith("teacher"):
            if self.teacher(stage.teacher).checkpoint:
                return _sha256_file(self.teacher_path(stage.teacher))[:16]
            return digest(stage.config)
        parts = []
        for dep in stage.deps:
            if dep.startswith("teacher"):
                path = self.teacher_path(dep.partition(":")[2] or "teacher")
                if not os.path.isfile(path):
                    return None
                parts.append(_sha256_file(path)[:16])
            elif dep in self.fingerprints:
                parts.append(self.fingerprints[dep])
            else:
                return None
        return digest({"config": stage.config, "inputs": parts})

    def status(self, stage: Stage, forced: bool) -> tuple[str, str | None]:
        """('reuse' | 'resume' | 'run', fingerprint); fingerprint None when an input does not exist yet."""
        fp = self.fingerprint(stage)
        state = self.read_state(stage.key)
        if fp is None or forced or state.get("fingerprint") != fp:
            return "run", fp
        if state.get("done") and all(os.path.exists(o) for o in stage.outputs()):
            return "reuse", fp
        return "resume", fp

    # -- running -----------------------------------------------------------------------------------
    def execute(self, only: tuple[str, ...] = (), force: tuple[str, ...] = (), dry_run: bool = False) -> dict:
        """Run (or, with dry_run, list) the stages; returns the report's rows."""
        match = lambda key, pats: any(key == q or key.startswith(q + ":") or key.startswith(q + "/") for q in pats)
        for pat in only + force:
            if not any(match(s.key, (pat,)) for s in self.stages):
                raise PipelineError(f"no stage matches {pat!r}; stages are {', '.join(s.key for s in self.stages)}")
        pending: set[str] = set()
        chosen = [s.key for s in self.stages if not only or match(s.key, only)]
        for stage in self.stages:
            selected = not only or match(stage.key, only)
            action, fp = self.status(stage, match(stage.key, force))
            if stage.key.startswith("teacher") and self.teacher(stage.teacher).checkpoint:
                action = "reuse"  # a given checkpoint: nothing to do
            if not selected:
                if action == "reuse":  # its fingerprint feeds the selected stages; its figures the report
                    self.fingerprints[stage.key] = fp
                    stage.result = self.read_state(stage.key).get("result", {})
                else:
                    if any(match(s.key, only) and stage.key in s.deps for s in self.stages):
                        raise PipelineError(f"stage {stage.key} is needed by the selected stages and is not done; "
                                            f"run it first (dfkd run {self.p.path} --only {stage.key}) or drop --only")
                continue
            if dry_run:
                if action == "reuse":  # downstream stages are judged against it, as in a real run
                    self.fingerprints[stage.key] = fp
                why = {"reuse": "output exists with the same fingerprint", "resume": "interrupted: continues",
                       "run": "after its inputs" if fp is None or any(d in pending for d in stage.deps) else "new"}
                self.echo(f"{stage.key:<40} {action:<7} {why[action]}")
                if action != "reuse":
                    pending.add(stage.key)
                continue
            if action == "reuse":
                self.echo(f"[{stage.key}] reused (fingerprint {fp})")
                self.fingerprints[stage.key] = fp
                stage.result = self.read_state(stage.key).get("result", {})
                continue
            self.echo(f"[{stage.key}] {'resuming' if action == 'resume' else 'running'} "
                      f"(stage {chosen.index(stage.key) + 1} of {len(chosen)})")
            prior = self.read_state(stage.key) if action == "resume" else {}
            self._write_state(stage.key, {"fingerprint": fp, "done": False, "seconds": prior.get("seconds", 0.0)})
            t0 = time.perf_counter()
            result = stage.run(action == "resume", action == "run")
            seconds = prior.get("seconds", 0.0) + time.perf_counter() - t0
            result["seconds"] = seconds
            fp = self.fingerprint(stage)  # a trained teacher's downstream identity is its weights
            self._write_state(stage.key, {"fingerprint": fp, "done": True, "seconds": seconds, "result": result})
            self.fingerprints[stage.key] = fp
            stage.result = result
            self.echo(f"[{stage.key}] done in {seconds:.0f} s")
        if dry_run:
            return {}
        return write_report(self, self.echo)

    # -- stage bodies ------------------------------------------------------------------------------
    def _teacher_runner(self, name: str) -> Callable[[bool, bool], dict[str, Any]]:
        def run(resume: bool, overwrite: bool) -> dict[str, Any]:
            t = self.teacher(name)
            return train_teacher(t.model, self.data, self.teacher_path(name), device=self.device,
                                 run_dir=self.path(f"{t.name}_run"), resume=resume, progress=self.progress,
                                 **{**settings_of(t, TeacherSettings), "seed": self.section_seed(t)})
        return run

    def _record_runner(self, name: str) -> Callable[[bool, bool], dict[str, Any]]:
        def run(resume: bool, overwrite: bool) -> dict[str, Any]:
            t = self.teacher(name)
            model, spec, _ = load_model(self.teacher_path(name), "teacher", self.p.model_code)
            rec, size = make_record(model, spec, self.data, self.record_path(name), layers=t.record_layers or None,
                                    per_class=t.record_per_class, device=self.device)
            return {"layers": rec.layers, "bytes": size}
        return run

    def _synth_runner(self, s: Any) -> Callable[[bool, bool], dict[str, Any]]:
        def run(resume: bool, overwrite: bool) -> dict[str, Any]:
            os.makedirs(self.path("stores"), exist_ok=True)
            seed = self.section_seed(s)
            tname = s.teacher or self.p.teachers[0].name
            if s.method == "real":
                return fill_real_store(self.store_path(s.name), self.teacher_path(tname), self.data, s.num_images,
                                       seed=seed, unit_size=s.batch_size, device=self.device, overwrite=True,
                                       model_code=self.p.model_code, views=s.views, view_mode=s.view_mode)
            student = s.student
            if student.startswith("distill:"):
                student = self.path("distill", student[len("distill:"):] + ".pt")
            job = SynthJob(s.method, s.num_images, self.store_path(s.name), dict(s.params), student or None,
                           self.record_path(tname) if s.stats else None, resume=resume,
                           overwrite=overwrite and not resume, device=self.device, progress=self.progress,
                           model_code=self.p.model_code, bank=tuple(self.store_path(b) for b in s.bank),
                           **{**settings_of(s, SynthSettings), "seed": seed})
            res = run_synth(job, self.teacher_path(tname))
            if "student" in res:  # a generator method's proxy student is a distilled student in its own right
                proxy, spec, _ = load_model(res["student"], "student", self.p.model_code)
                res["student_top1"] = accuracy(proxy, self.data.test_images, self.data.test_labels, spec.mean,
                                               spec.std, device=self.device)
            return res
        return run

    def section_seed(self, section: Any) -> int:
        """A [[teacher]], [[synth]] or [[distill]] section's seed: its own, else [run].seed."""
        return self.p.run.seed if section.seed is None else section.seed

    def _distill_runner(self, d: Any, store_name: str) -> Callable[[bool, bool], dict[str, Any]]:
        def run(resume: bool, overwrite: bool) -> dict[str, Any]:
            out = self.path("distill", d.name, store_name)
            if not resume and os.path.exists(os.path.join(out, "run.pt")):
                os.remove(os.path.join(out, "run.pt"))  # a fresh run: the old one had other settings
            paths = [self.store_path(part) for part in store_name.split("+")]
            recipe = {**settings_of(d, DistillSettings), "seed": self.section_seed(d),
                      "teacher": self.teacher_path(d.teacher) if d.teacher else None}
            job = DistillJob(paths, list(d.students), out, device=self.device, resume=resume, progress=self.progress,
                             model_code=self.p.model_code, **recipe)
            m = run_distill(job, (self.data.test_images, self.data.test_labels))
            for name in m["at_chance"]:
                self.echo(at_chance_warning(f"{name} of distill:{d.name}/{store_name}",
                                            'optimizer = "adam", temperature = 4'))
            return {"images": m["images"], "students": {k: {"arch": v["arch"], "parameters": v["parameters"],
                                                         "test_top1": v["final"].get("test_top1")}
                                                     for k, v in m["students"].items()}}
        return run
