"""edgevl_jax.quant."""
