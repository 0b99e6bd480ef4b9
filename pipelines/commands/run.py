"""`dfkd run`: a pipeline file's stages, in order, each reused when already done."""

from __future__ import annotations

import click

from .options import quiet_option


@click.command("run")
@click.argument("pipeline", required=False)
@click.option("--only", multiple=True, help="Run only this stage (teacher, record, synth, synth:NAME, distill, "
                                            "distill:NAME); repeatable. Its inputs must be done already.")
@click.option("--force", multiple=True, help="Re-run this stage even when its output is up to date; repeatable.")
@click.option("--dry-run", is_flag=True, help="List the stages and whether each would run, resume or be reused.")
@click.option("--out", default=None, help="Override [run].out, the folder every output goes to.")
@quiet_option
def run(pipeline: str | None, only: tuple[str, ...], force: tuple[str, ...], dry_run: bool, out: str | None) -> None:
    """Run a pipeline file: teacher -> (record) -> synthesis stores -> students -> report.

    Without PIPELINE, runs the embedded demo (pipelines/demo.toml: digits, DeepInversion, two students,
    a few minutes on a laptop CPU). A stage whose output exists with the same fingerprint is reused.
    """
    import os

    from ..runner import Runner
    from ..spec import load_pipeline

    path = pipeline or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo.toml")
    p = load_pipeline(path)
    if out:
        p.run.out = out
    Runner(p, echo=click.echo).execute(only=only, force=force, dry_run=dry_run)
