"""The MDMS capability: VEE ingest, the hot tier (fog Redis), the cold tier (S3 Parquet), tiering,
interval queries and time-of-use billing."""
