"""``python -m metertwin.jobs``: see :mod:`metertwin.jobs.cli`."""

import sys

from metertwin.jobs.cli import run

sys.exit(run(sys.argv[1:]))
