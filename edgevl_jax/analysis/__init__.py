"""edgevl_jax.analysis."""
