"""The `dfkd` commands, one file per command family. Each imports its work only when it runs: --help stays fast."""
