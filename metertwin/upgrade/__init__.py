"""The upgrade capability: releases, the per-twin binding that routes calls to the bound release,
migrations, upgrade operations (canary, promote, rollback) and release health."""
