"""UniCL: contrastive image-text loss with label-aware targets.

Yang et al. 2022, "Unified Contrastive Learning in Image-Text-Label Space".
CLIP's InfoNCE treats every off-diagonal pair of a batch as a negative. When
several examples share a label (e.g. texts that are class prompts), that
pushes an image away from texts that describe it equally well: conflicting
targets. UniCL instead spreads each row's target uniformly over every column
with the same label; with all labels distinct it is exactly CLIP's loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def unicl_loss(*, logits_per_image: jax.Array,
               labels: jax.Array) -> jax.Array:
  """Symmetric cross-entropy with targets uniform over same-label columns.

  loss = 0.5 (mean_i H(T_i, softmax(L_i)) + mean_j H(T_j, softmax(L^T_j)))
  with T_ij = [y_i = y_j] / #{k: y_k = y_i}. T is symmetric in its mask, so
  text rows use the same targets as image rows.

  Args:
    logits_per_image: (B, B) scaled image-text similarities; row i is image
      i, column j is text j.
    labels: (B,) integer label of each example (shared by its image and its
      text).

  Returns:
    Scalar loss.
  """
  if logits_per_image.ndim != 2 or (logits_per_image.shape[0]
                                    != logits_per_image.shape[1]):
    raise ValueError(f"logits_per_image must be square (B, B), found shape "
                     f"{logits_per_image.shape}.")
  if labels.shape != (logits_per_image.shape[0],):
    raise ValueError(f"labels must have shape ({logits_per_image.shape[0]},) "
                     f"to match logits_per_image, found {labels.shape}.")
  same = (labels[:, None] == labels[None, :]).astype(logits_per_image.dtype)
  targets = same / jnp.sum(same, axis=1, keepdims=True)

  def ce(logits):
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=1),
                             axis=1))

  return 0.5 * (ce(logits_per_image) + ce(logits_per_image.T))


def clip_loss(*, logits_per_image: jax.Array) -> jax.Array:
  """CLIP's symmetric InfoNCE over a batch (the diagonal is the match).

  Args:
    logits_per_image: (B, B) scaled image-text similarities, row i = image
      i against every text.

  Returns:
    Scalar: mean of the image->text and text->image cross-entropies.
  """
  labels = jnp.arange(logits_per_image.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (ce(logits_per_image, labels).mean()
                + ce(logits_per_image.T, labels).mean())
