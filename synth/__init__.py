"""Synthesis stage: turns a teacher into a surrogate dataset written through `store`."""
