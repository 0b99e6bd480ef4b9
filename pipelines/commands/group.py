"""The click group class of every `dfkd` command group: each DfkdError or file-system fault becomes one line."""

from __future__ import annotations

import errno
from typing import Any

import click

from ...store.toolbox.errors import DfkdError


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
