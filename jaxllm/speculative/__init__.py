"""Speculative decoding inside the jitted decode loop: proposers (n-gram, draft model, Medusa heads),
verification in one target forward, and acceptance that keeps the target distribution."""
