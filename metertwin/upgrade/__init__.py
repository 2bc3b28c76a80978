"""The upgrade capability: releases, the per-twin binding that routes calls to the bound release,
migrations, upgrade operations (canary, promote, rollback), release health and the operator's CLI.

Named interfaces to the rest of the package: :mod:`~metertwin.upgrade.binding` (calls) and
:mod:`~metertwin.upgrade.inbox` (readings). Operations: :mod:`~metertwin.upgrade.operations`
(lifecycle) over :mod:`~metertwin.upgrade.spec`, :mod:`~metertwin.upgrade.store`,
:mod:`~metertwin.upgrade.switch`, :mod:`~metertwin.upgrade.drain`, :mod:`~metertwin.upgrade.rollback`
and :mod:`~metertwin.upgrade.status`; :mod:`~metertwin.upgrade.health` judges a canary.
"""
