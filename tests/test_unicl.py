"""UniCL loss: hand-computed values, reduction to CLIP, bad shapes."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from edgevl_jax import losses


def test_unicl_hand_computed_shared_label():
  logits = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  # Both examples share a label: each row's target is (1/2, 1/2).
  got = losses.unicl_loss(logits_per_image=logits, labels=jnp.array([3, 3]))
  want = 0.5 * (np.log1p(np.exp(-1.0)) + np.log1p(np.exp(1.0)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Distinct labels: one-hot diagonal target.
  got = losses.unicl_loss(logits_per_image=logits, labels=jnp.array([0, 1]))
  np.testing.assert_allclose(got, np.log1p(np.exp(-1.0)), rtol=1e-6)


def test_unicl_equals_clip_loss_with_unique_labels():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)) * 3,
                       jnp.float32)
  labels = jnp.arange(6)
  ce = optax.softmax_cross_entropy_with_integer_labels
  clip = 0.5 * (ce(logits, labels).mean() + ce(logits.T, labels).mean())
  np.testing.assert_allclose(
      losses.unicl_loss(logits_per_image=logits, labels=jnp.array(
          [5, 2, 7, 0, 1, 9])), clip, rtol=1e-5)


def test_unicl_rejects_bad_shapes():
  with pytest.raises(ValueError, match="labels must have shape"):
    losses.unicl_loss(logits_per_image=jnp.zeros((3, 3)),
                      labels=jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="must be square"):
    losses.unicl_loss(logits_per_image=jnp.zeros((3, 2)),
                      labels=jnp.zeros((3,), jnp.int32))
