"""Operator tooling for twin upgrades that stays outside the shared package.

* ``python -m metertwin_upgrade``: the entry point of the CLI, :mod:`metertwin.upgrade.cli`
  (it talks to ``edge-upgrade-manager`` over HTTP, so it lives in the upgrade capability);
* :mod:`metertwin_upgrade.local`: a local edge zone serving the versioned functions (tests,
  benchmark) - it starts ``storage.embedded`` services, which nothing under ``metertwin/`` may import;
* :mod:`metertwin_upgrade.stackfile`: the subset of the repository's stack.yml that zone serves
  (stack.yml is not part of a function image, so this stays beside ``local``).
"""
