"""Pallas GPU kernels (Mosaic GPU), each beside its pure-jnp reference."""
