"""Redis keys and TTLs of the p2p capability. One market's keys share the hash tag ``{market_id}`` (Redis Cluster)."""

from __future__ import annotations

from metertwin.core.keys import PREFIX


# --- p2p market ----------------------------------------------------------------------------
# One hash tag per market, so a market's keys share a Redis Cluster slot.
def p2p_market(market_id: str) -> str:
    """Hash: a market's spec (JSON), status, result (JSON), timestamps."""
    return f"{PREFIX}:p2p:{{{market_id}}}:market"


def p2p_participants(market_id: str) -> str:
    """Hash: meter id -> participant profile (JSON) of one market."""
    return f"{PREFIX}:p2p:{{{market_id}}}:participants"


def p2p_rounds(market_id: str) -> str:
    """List: one JSON record per negotiation round, in order."""
    return f"{PREFIX}:p2p:{{{market_id}}}:rounds"


def p2p_trades(market_id: str) -> str:
    """Hash: meter id -> final trade and settlement (JSON) of one market."""
    return f"{PREFIX}:p2p:{{{market_id}}}:trades"


def p2p_meter_trades(meter_id: str) -> str:
    """Sorted set: ids of the markets a meter traded in, scored by slot start (epoch s)."""
    return f"{PREFIX}:p2p:mtrades:{{{meter_id}}}"


#: Sorted set of every market id in this zone, scored by slot start (epoch s).
P2P_MARKETS = f"{PREFIX}:p2p:markets"
#: Round records are for watching a market converge; trades and settlements are kept.
P2P_ROUNDS_RETENTION_S = 7 * 24 * 3600
#: A market may have at most this many participants (one round must fit a round timeout).
P2P_MAX_PARTICIPANTS = 5_000
