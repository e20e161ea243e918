"""edgevl_jax.eval."""
