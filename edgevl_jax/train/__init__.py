"""edgevl_jax.train."""
