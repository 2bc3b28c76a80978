"""The fleet storage as it was before issue 13's compaction (JSON documents in one hash, index sets of meter
ids, full-JSON audit entries): kept only so ``loadtest.fleet_bench --compare`` measures before and after in one run."""
