"""The peer-to-peer trading capability: markets among twins, negotiated in rounds; only the outcome
goes to the meter."""
