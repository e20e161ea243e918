"""edgevl_jax.export."""
