"""edgevl_jax.data."""
