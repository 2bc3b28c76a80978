"""The twin core: twin state (device-shadow model), commands, uplink parsing, read queries,
per-meter broker accounts and the wire messages between a meter and its twin."""
