"""Operator tooling for twin upgrades: the CLI (``python -m metertwin_upgrade``), the stack.yml
entries of the versioned functions, and a local edge zone serving them (tests, benchmark)."""
