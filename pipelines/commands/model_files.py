"""`dfkd import-teacher` and `dfkd export`: model files in from other tools, and students out to them."""

from __future__ import annotations

import os

import click

from .options import model_code_option


def _check_out(out: str, overwrite: bool, *sources: str) -> None:
    """Refuse to write over a file the user has (or over the command's own input) unless asked to."""
    if any(os.path.abspath(out) == os.path.abspath(s) for s in sources):
        raise click.UsageError(f"--out {out} is the input file itself; choose another --out")
    if os.path.exists(out) and not overwrite:
        raise click.UsageError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.UsageError(f"{what} takes comma-separated numbers, got {text!r}") from None


@click.command("import-teacher")
@click.option("--arch", required=True, help="The architecture the weights belong to: torchvision:NAME, timm:NAME, "
                                            "a zoo name, or package.module:factory (then loading the checkpoint "
                                            "later needs --model-code with the same name).")
@click.option("--weights", required=True, help="A state_dict (.pt/.pth, loaded with weights_only), a .safetensors "
                                               "file, or a TorchScript file (a program: import only files you trust).")
@click.option("--input-shape", required=True, help="C,H,W of the images the teacher takes (square), e.g. 3,224,224.")
@click.option("--num-classes", type=click.IntRange(min=2), required=True, help="Logits the teacher gives.")
@click.option("--mean", required=True, help="Per-channel normalization mean of pixels in [0, 1], e.g. 0.485,0.456,0.406.")
@click.option("--std", required=True, help="Per-channel normalization std, e.g. 0.229,0.224,0.225.")
@click.option("--out", required=True, help="The dfkd checkpoint to write (for --teacher of every command).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --out.")
def import_teacher_cmd(arch: str, weights: str, input_shape: str, num_classes: int, mean: str, std: str, out: str,
                       overwrite: bool) -> None:
    """Check that WEIGHTS fit ARCH and a forward pass gives NUM_CLASSES logits, then write a dfkd checkpoint."""
    from ...distill.import_teacher import import_teacher

    _check_out(out, overwrite, weights)
    shape = tuple(int(v) for v in _floats(input_shape, "--input-shape"))
    if len(shape) != 3:
        raise click.UsageError(f"--input-shape takes C,H,W, got {input_shape!r}")
    model, spec = import_teacher(arch, weights, shape, num_classes, _floats(mean, "--mean"), _floats(std, "--std"), out)
    params = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {out}: {arch}, {params:,} parameters, {spec.in_channels}x{spec.image_size}x{spec.image_size} "
               f"-> {num_classes} logits")


@click.command("export")
@click.option("--model", "model_path", required=True, help="A dfkd checkpoint (a student from dfkd distill, or a teacher).")
@click.option("--format", "fmt", type=click.Choice(["torchscript", "onnx", "safetensors"]), required=True,
              help="torchscript / onnx: the whole classifier, float pixels in [0, 1] (N x C x H x W) in, logits out, "
                   "normalization inside; safetensors: the raw weights, normalization stated in the metadata.")
@click.option("--out", required=True, help="The file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --out.")
@model_code_option
def export_cmd(model_path: str, fmt: str, out: str, overwrite: bool, model_code: tuple[str, ...]) -> None:
    """Write a checkpoint's model as TorchScript, ONNX (needs the onnx extra) or safetensors."""
    from ...distill.checkpoint import load_model
    from ...distill.export import export_model

    _check_out(out, overwrite, model_path)
    model, spec, _ = load_model(model_path, "model", model_code)
    export_model(model, spec, fmt, out)
    c, h, w = spec.image_shape
    takes = "normalized pixels (see its metadata)" if fmt == "safetensors" else "float pixels in [0, 1]"
    click.echo(f"wrote {out} ({fmt}): {spec.arch}, takes N x {c} x {h} x {w} {takes}, gives {spec.num_classes} logits")
