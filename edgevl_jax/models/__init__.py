"""edgevl_jax.models."""
