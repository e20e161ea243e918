"""Dual-modality knowledge distillation loss (EdgeVL stage 1).

The student embeds the 2B images [non-RGB; RGB] of B co-registered pairs in
one forward pass; both halves are pulled to the frozen teacher's embedding of
the RGB image, so that either modality lands in CLIP's joint space.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KD_KINDS = ("l1", "l2", "cosine")


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis` (PyTorch `F.normalize` semantics)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def dual_modality_kd_loss(
    *,
    student_embeddings: jax.Array,
    teacher_embeddings: jax.Array,
    kind: str = "l1",
) -> jax.Array:
  """Distance between normalised student embeddings and the tiled teacher.

  Args:
    student_embeddings: (2B, D) student outputs on [non-RGB; RGB] (or any
      multiple kB of the teacher batch, e.g. B for the single-modality
      ablations); normalised here.
    teacher_embeddings: (B, D) teacher embeddings of the RGB images;
      normalised here and tiled to [t; t] (no gradient flows into them).
    kind: 'l1' (mean absolute error over all 2B x D elements, the paper's
      loss), 'l2' (mean squared error over all elements) or 'cosine'
      (mean of 1 - cos over the 2B rows).

  Returns:
    Scalar float32 loss.
  """
  if kind not in KD_KINDS:
    raise ValueError(f"kind must be one of {KD_KINDS}, found {kind!r}.")
  if student_embeddings.ndim != 2 or teacher_embeddings.ndim != 2:
    raise ValueError(
        "student_embeddings and teacher_embeddings must be 2-D (N, D); found "
        f"{student_embeddings.shape} and {teacher_embeddings.shape}.")
  n, d = student_embeddings.shape
  b, dt = teacher_embeddings.shape
  if d != dt or b == 0 or n % b:
    raise ValueError(
        "student_embeddings must be (k*B, D) for teacher_embeddings (B, D); "
        f"found {student_embeddings.shape} vs {teacher_embeddings.shape}. "
        "Set the student's embed_dim to the teacher's embedding size.")
  s = l2_normalize(student_embeddings.astype(jnp.float32))
  t = l2_normalize(jax.lax.stop_gradient(teacher_embeddings).astype(jnp.float32))
  t = jnp.tile(t, (n // b, 1))
  if kind == "l1":
    return jnp.mean(jnp.abs(s - t))
  if kind == "l2":
    return jnp.mean(jnp.square(s - t))
  return jnp.mean(1.0 - jnp.sum(s * t, axis=-1))
