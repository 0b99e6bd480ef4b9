"""The `dfkd` command line: one group, a sub-command per stage, `store` tools for the dataset itself."""

from __future__ import annotations

import errno
import json
import sys
from typing import Any

import click

from dfkd import __version__ as VERSION
from dfkd.store.errors import DfkdError


class UserError(click.ClickException):
    """A user mistake: one line on stderr, exit code 2, never a traceback."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def os_error_line(exc: OSError) -> str:
    """One line for an ordinary fault of the file system: which path, what happened, what to do."""
    where = exc.filename or "a file"
    reason = exc.strerror or str(exc)
    fix = {errno.ENOSPC: "free some space or write elsewhere, then rerun (add --resume where the command has it)",
           errno.EDQUOT: "free some space or write elsewhere, then rerun (add --resume where the command has it)",
           errno.EACCES: "choose a folder you can write to, or fix its permissions",
           errno.EPERM: "choose a folder you can write to, or fix its permissions",
           errno.EROFS: "the file system is read-only; write to another folder",
           errno.EEXIST: "a file stands where a folder is needed; choose another path",
           errno.ENOTDIR: "a file stands where a folder is needed; choose another path",
           errno.ENOENT: "check the path"}.get(exc.errno or 0, "check the path and the disk")
    return f"{where}: {reason}; {fix}"


class DfkdGroup(click.Group):
    """A click group that turns every DfkdError, and ordinary file-system faults, into one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DfkdError as exc:
            raise UserError(str(exc)) from None
        except click.UsageError as exc:  # one line, not click's usage block: what is wrong and where help is
            where = exc.ctx.command_path if exc.ctx is not None else "dfkd"
            raise UserError(f"{exc.format_message()} (see {where} --help)") from None
        except OSError as exc:
            raise UserError(os_error_line(exc)) from None


@click.group(cls=DfkdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="dfkd")
def cli() -> None:
    """Data-free knowledge distillation: synthesize a surrogate dataset from a teacher into a store,
    then distill students from the store."""


@cli.group(cls=DfkdGroup, name="store")
def store_group() -> None:
    """Inspect, check, convert and preview a synthetic dataset store (Zarr or WebDataset)."""


def _fmt_counts(counts: list[int]) -> str:
    return " ".join(f"{k}:{c}" for k, c in enumerate(counts))


@store_group.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def store_info(path: str, as_json: bool) -> None:
    """Shape, classes, per-class counts, provenance and completeness of the store at PATH."""
    from dfkd.store.report import info

    d = info(path)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    c, h, w = d["image_shape"]
    lines = [
        f"store        {d['path']} ({d['backend']}, schema v{d['schema_version']}, {d['layout']})",
        f"samples      {d['readable_samples']} readable of {d['num_samples']} "
        f"({d['units_done']}/{d['units_total']} units of {d['unit_size']} done"
        f"{', complete' if d['complete'] else ', INCOMPLETE'})",
        f"images       uint8 {c}x{h}x{w}, mean {d['mean']}, std {d['std']}",
        f"logits       {d['logits_dtype']} x {d['num_classes']} classes",
        f"labels       {_fmt_counts(d['label_counts'])}" + (f" unlabelled:{d['unlabelled']}" if d["unlabelled"] else ""),
        f"teacher top1 {_fmt_counts(d['teacher_argmax_counts'])}",
        f"base seed    {d['base_seed']}",
    ]
    for key, value in sorted(d["provenance"].items()):
        lines.append(f"  {key}: {json.dumps(value)}")
    click.echo("\n".join(lines))


@store_group.command("verify")
@click.argument("path")
def store_verify(path: str) -> None:
    """Check every finished unit of PATH; exit 1 when anything is wrong or unfinished."""
    from dfkd.store.report import verify

    report = verify(path)
    for note in report.notes:
        click.echo(f"note: {note}")
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    if not report.ok:
        click.echo(f"FAILED: {len(report.problems)} problem(s) in {path}", err=True)
        sys.exit(1)
    click.echo(f"OK: {path} ({report.units_checked} units checked)")


@store_group.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--backend", type=click.Choice(["zarr", "webdataset"]), default=None,
              help="Destination backend (default: from DST's suffix, .zarr or .wds; else zarr).")
@click.option("--unit-size", type=click.IntRange(min=1), default=None, help="Samples per write unit in DST (default: SRC's).")
@click.option("--compressor", type=click.Choice(["lz4", "zstd", "none"]), default=None, help="Zarr compressor.")
@click.option("--image-format", type=click.Choice(["png", "npy"]), default=None, help="WebDataset image encoding.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dfkd store at DST.")
def store_convert(src: str, dst: str, backend: str | None, unit_size: int | None, compressor: str | None,
                  image_format: str | None, overwrite: bool) -> None:
    """Copy the store SRC to DST in another backend (Zarr <-> WebDataset), content identical."""
    from dfkd.store.backends import backend_for_new
    from dfkd.store.convert import convert

    target = backend_for_new(dst, backend).name
    options: dict[str, Any] = {}
    if compressor is not None:
        if target != "zarr":
            raise UserError("--compressor applies to a zarr destination only")
        options["compressor"] = compressor
    if image_format is not None:
        if target != "webdataset":
            raise UserError("--image-format applies to a webdataset destination only")
        options["image_format"] = image_format
    writer = convert(src, dst, backend=target, unit_size=unit_size, overwrite=overwrite, **options)
    click.echo(f"wrote {dst} ({writer.backend.name}, {writer.meta.num_units} units of {writer.meta.unit_size})")


@store_group.command("preview")
@click.argument("path")
@click.option("--out", required=True, help="PNG file to write.")
@click.option("--per-class", type=click.IntRange(min=1), default=8, show_default=True, help="Images per class row.")
def store_preview(path: str, out: str, per_class: int) -> None:
    """Write a per-class image grid of the store at PATH."""
    from dfkd.store.preview import preview

    rows, cols = preview(path, out, per_class=per_class)
    click.echo(f"wrote {out} ({rows} classes x {cols} images)")


@cli.command("run")
@click.argument("pipeline", required=False)
@click.option("--only", multiple=True, help="Run only this stage (teacher, record, synth, synth:NAME, distill, "
                                            "distill:NAME); repeatable. Its inputs must be done already.")
@click.option("--force", multiple=True, help="Re-run this stage even when its output is up to date; repeatable.")
@click.option("--dry-run", is_flag=True, help="List the stages and whether each would run, resume or be reused.")
@click.option("--out", default=None, help="Override [run].out, the folder every output goes to.")
def run(pipeline: str | None, only: tuple[str, ...], force: tuple[str, ...], dry_run: bool, out: str | None) -> None:
    """Run a pipeline file: teacher -> (record) -> synthesis stores -> students -> report.

    Without PIPELINE, runs the embedded demo (pipelines/demo.toml: digits, DeepInversion, two students,
    a few minutes on a laptop CPU). A stage whose output exists with the same fingerprint is reused.
    """
    import os

    from .runner import Runner
    from .spec import load_pipeline

    path = pipeline or os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.toml")
    p = load_pipeline(path)
    if out:
        p.run.out = out
    Runner(p, echo=click.echo).execute(only=only, force=force, dry_run=dry_run)


def _add_stage_commands() -> None:
    from .stages import distill_cmd, train_teacher
    from .synth_cmds import record_cmd, synth_cmd

    for command in (train_teacher, record_cmd, synth_cmd, distill_cmd):
        cli.add_command(command)


_add_stage_commands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dfkd")


if __name__ == "__main__":
    main()
