"""Errors the store raises: one clear line that names the problem and the fix."""


class DfkdError(Exception):
    """Base of every error dfkd reports to a user as one line (the CLI prints it, no traceback)."""


class StoreError(DfkdError):
    """A store is missing, foreign, corrupt, of another schema, or given samples that do not fit it."""
