"""edgevl_jax: EdgeVL (dual-modality KD + quantisation-aware contrastive
learning) in JAX/Flax, with data-free adversarial KD and CKA analysis."""

__version__ = "0.1.0"
