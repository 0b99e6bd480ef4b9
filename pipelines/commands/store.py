"""`dfkd store info|verify|convert|preview`: tools for the synthetic dataset itself."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ...store.backend_choices import BACKENDS, COMPRESSORS, IMAGE_FORMATS
from ...store.schema import MAX_VIEWS
from ...store.toolbox.augment import VIEW_MODE_HELP, VIEW_MODES

from .group import DfkdGroup, UserError
from .options import device_option, model_code_option, quiet_option, resolve_device


@click.group(cls=DfkdGroup, name="store")
def store_group() -> None:
    """Inspect, check, convert and preview a synthetic dataset store (Zarr or WebDataset)."""


def _fmt_counts(counts: list[int]) -> str:
    return " ".join(f"{k}:{c}" for k, c in enumerate(counts))


@store_group.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def store_info(path: str, as_json: bool) -> None:
    """Shape, classes, per-class counts, provenance and completeness of the store at PATH."""
    from ...store.report import info

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
        "checksums    " + ("CRC-32 of every unit's images, logits and labels, kept with its done flag" if d["checksums"]
                           else "NONE: its content cannot be verified (`dfkd store verify` says what to do)"),
        "views        " + (f"{d['views']} per image ({d['view_recipe']['mode']}, pad {d['view_recipe']['pad']}), "
                            f"{d['units_with_views']}/{d['units_done']} finished units labelled" if d["views"]
                            else "none (add view labels with `dfkd store label`)"),
    ]
    for key, value in sorted(d["provenance"].items()):
        lines.append(f"  {key}: {json.dumps(value)}")
    click.echo("\n".join(lines))


@store_group.command("verify")
@click.argument("path")
@click.option("--allow-unchecked", is_flag=True,
              help="A store written without checksums (an old dfkd's) passes if all else holds; its bytes go unchecked.")
def store_verify(path: str, allow_unchecked: bool) -> None:
    """Check every finished unit of PATH; exit 1 when anything is wrong or unfinished."""
    from ...store.report import verify

    report = verify(path, allow_unchecked=allow_unchecked)
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
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Destination backend (default: from DST's suffix, .zarr or .wds; else zarr).")
@click.option("--unit-size", type=click.IntRange(min=1), default=None, help="Samples per write unit in DST (default: SRC's).")
@click.option("--compressor", type=click.Choice(COMPRESSORS), default=None, help="Zarr compressor.")
@click.option("--image-format", type=click.Choice(IMAGE_FORMATS), default=None, help="WebDataset image encoding.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dfkd store at DST.")
@click.option("--trust-unchecked", is_flag=True,
              help="SRC has no checksums (an old dfkd's store) and you vouch for it: DST is written with fresh ones.")
def store_convert(src: str, dst: str, backend: str | None, unit_size: int | None, compressor: str | None,
                  image_format: str | None, overwrite: bool, trust_unchecked: bool) -> None:
    """Copy the store SRC to DST in another backend (Zarr <-> WebDataset), content identical."""
    from ...store.backends import backend_for_new
    from ...store.convert import convert

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
    writer = convert(src, dst, backend=target, unit_size=unit_size, overwrite=overwrite,
                     trust_unchecked=trust_unchecked, **options)
    click.echo(f"wrote {dst} ({writer.backend.name}, {writer.meta.num_units} units of {writer.meta.unit_size})")


@store_group.command("label")
@click.argument("path")
@click.option("--teacher", required=True, help="The checkpoint of the teacher that made the store (checked by fingerprint).")
@click.option("--views", type=click.IntRange(min=1, max=MAX_VIEWS), default=8, show_default=True,
              help="Seeded augmented views per image whose teacher logits are stored (K teacher forwards per image, once).")
@click.option("--view-mode", type=click.Choice(VIEW_MODES), default="flip-crop", show_default=True,
              help=VIEW_MODE_HELP)
@click.option("--resume", is_flag=True, help="Finish an interrupted labelling (exactly the units without views).")
@click.option("--overwrite", is_flag=True, help="Replace the store's existing view labels.")
@device_option
@model_code_option
@quiet_option
def store_label(path: str, teacher: str, views: int, view_mode: str, resume: bool, overwrite: bool, device: str,
                model_code: tuple[str, ...]) -> None:
    """Add the teacher's logits of VIEWS seeded augmented views of every image to the store at PATH.

    A view is re-created exactly from the stored image and its seed, so `dfkd distill` then trains on
    augmented views with no teacher; `dfkd synth --views K` gives the same labels at synthesis time.
    """
    from ...distill.checkpoint import load_model
    from ...synth.view_labels import label_store

    model, _, _ = load_model(teacher, "teacher", model_code)
    res = label_store(path, model, views, mode=view_mode, resume=resume, overwrite=overwrite,
                      device=resolve_device(device))
    click.echo(f"labelled {res['units_labelled']} units of {path} with {views} views ({view_mode}): "
               f"{res['teacher_forwards']:,} teacher forwards in {res['seconds']:.0f} s")


@store_group.command("preview")
@click.argument("path")
@click.option("--out", required=True, help="PNG file to write.")
@click.option("--per-class", type=click.IntRange(min=1), default=8, show_default=True, help="Images per class row.")
def store_preview(path: str, out: str, per_class: int) -> None:
    """Write a per-class image grid of the store at PATH."""
    from ...store.preview import preview

    rows, cols = preview(path, out, per_class=per_class)
    click.echo(f"wrote {out} ({rows} classes x {cols} images)")
