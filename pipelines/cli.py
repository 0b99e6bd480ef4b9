"""The `dfkd` command line: the group and its entry point. Each command lives in pipelines/commands/<name>.py;
those files import their work (torch and the stages) only when a command runs, so every --help is fast."""

from __future__ import annotations

import click

from ..store.toolbox.version import __version__ as VERSION

from .commands.distill import distill_cmd
from .commands.group import DfkdGroup
from .commands.model_files import export_cmd, import_teacher_cmd
from .commands.options import quiet_option
from .commands.record import record_cmd
from .commands.run import run
from .commands.store import store_group
from .commands.synth import methods_cmd, synth_cmd
from .commands.teacher import train_teacher


@click.group(cls=DfkdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="dfkd")
@quiet_option
def cli() -> None:
    """Data-free knowledge distillation: synthesize a surrogate dataset from a teacher into a store,
    then distill students from the store."""


for _command in (train_teacher, import_teacher_cmd, record_cmd, synth_cmd, methods_cmd, distill_cmd, export_cmd,
                 store_group, run):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dfkd")


if __name__ == "__main__":
    main()
