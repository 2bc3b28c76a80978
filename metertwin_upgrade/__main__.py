"""``python -m metertwin_upgrade``: see :mod:`metertwin_upgrade.cli`."""

import sys

from metertwin_upgrade.cli import run

sys.exit(run(sys.argv[1:]))
