"""``python -m metertwin_upgrade``: the operator's CLI, :mod:`metertwin.upgrade.cli`."""

import sys

from metertwin.upgrade.cli import run

sys.exit(run(sys.argv[1:]))
