"""The `dfkd` command line and pipeline files that wire the synthesis and distillation stages."""
