"""shardgrad: one graph IR for the whole training step, run locally, over MPI or on Ray."""
