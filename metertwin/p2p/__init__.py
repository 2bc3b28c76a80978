"""The peer-to-peer trading capability: markets among twins, negotiated in rounds; only the outcome
goes to the meter.

Pure market maths: :mod:`~metertwin.p2p.market` (params, bidders, bids), :mod:`~metertwin.p2p.negotiation`
(the round-by-round price), :mod:`~metertwin.p2p.clearing` (allocation, reference clearing),
:mod:`~metertwin.p2p.participants` (validated input). With I/O: :mod:`~metertwin.p2p.store` (Redis),
:mod:`~metertwin.p2p.forecast` (from twin data), :mod:`~metertwin.p2p.registration` (joining),
:mod:`~metertwin.p2p.channels` (asking twins in-zone or through other zones' gateways; needs ``httpx``),
:mod:`~metertwin.p2p.runner` (a whole market run) and :mod:`~metertwin.p2p.settlement` (trade lines,
delivery to meters). The ``p2p-bid`` function imports only the modules that need no ``httpx``.
"""
