"""``metertwin.client``: a small typed Python client (httpx) for every REST route of every metertwin function.

    from metertwin.client import Client, errors
    with Client.from_env(token=billing_token) as mt:
        for meter in mt.registry.iter_meters():
            profile = mt.mdms.load_profile(meter, "2026-01-01", "2026-02-01", interval="1h")

See docs/api.md (also: generating clients for other languages from each zone's ``/openapi.json``).
"""

from metertwin.client import errors
from metertwin.client.client import Client, System, Zone
from metertwin.client.errors import ApiError

__all__ = ["ApiError", "Client", "System", "Zone", "errors"]
