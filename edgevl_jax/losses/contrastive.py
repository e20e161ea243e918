"""Triplet losses and semi-hard mining (EdgeVL stage 2).

Positives share the teacher's pseudo-label with the anchor, negatives do not.
A semi-hard negative is farther from the anchor than the positive, but by
less than the margin: d_p < d_n < d_p + margin. Distances are Euclidean on
L2-normalised embeddings, the space the loss itself works in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax.losses.distill import l2_normalize


def pairwise_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """Euclidean distances (N, M) between rows of x (N, D) and y (M, D)."""
  sq = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :]
        - 2.0 * x @ y.T)
  # sqrt'(0) is infinite: keep the gradient finite on the diagonal.
  return jnp.sqrt(jnp.maximum(sq, 1e-12))


def triplet_margin_loss(
    *,
    anchor: jax.Array,
    positive: jax.Array,
    negatives: jax.Array,
    negative_mask: jax.Array,
    margin: float = 0.3,
) -> jax.Array:
  """Triplet margin loss with several negatives per anchor.

  sum_{i,k valid} max(0, |a_i - p_i| - |a_i - n_ik| + margin) / #valid, with
  every embedding L2-normalised first.

  Args:
    anchor: (N, D) anchor embeddings.
    positive: (N, D) one positive per anchor.
    negatives: (N, K, D) up to K negatives per anchor.
    negative_mask: (N, K) bool, True where the negative exists (padding for
      anchors with fewer than K negatives is False).
    margin: triplet margin (paper 0.3).

  Returns:
    Scalar loss; 0 when no negative is valid.
  """
  if negatives.ndim != 3 or negatives.shape[:1] != anchor.shape[:1]:
    raise ValueError(
        f"negatives must be (N, K, D) with N = {anchor.shape[0]}; found "
        f"{negatives.shape}.")
  if negative_mask.shape != negatives.shape[:2]:
    raise ValueError(
        f"negative_mask must be {negatives.shape[:2]}; found "
        f"{negative_mask.shape}.")
  a = l2_normalize(anchor.astype(jnp.float32))
  p = l2_normalize(positive.astype(jnp.float32))
  n = l2_normalize(negatives.astype(jnp.float32))
  d_p = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a - p), -1), 1e-12))
  d_n = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a[:, None] - n), -1), 1e-12))
  losses = jnp.maximum(d_p[:, None] - d_n + margin, 0.0)
  mask = negative_mask.astype(jnp.float32)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def semi_hard_negative_mask(
    *, d_positive: jax.Array, d_negative: jax.Array, margin: float
) -> jax.Array:
  """Semi-hard condition d_p < d_n < d_p + margin.

  Args:
    d_positive: (N,) anchor-positive distances.
    d_negative: (N, M) anchor-candidate distances.
    margin: triplet margin.

  Returns:
    (N, M) bool mask (label constraints are the caller's).
  """
  d_p = d_positive[:, None]
  return (d_negative > d_p) & (d_negative < d_p + margin)


def offline_semi_hard_triplets(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    margin: float,
    max_negatives: int = 3,
    rng: np.random.Generator | int,
    normalize: bool = True,
    chunk: int = 1024,
) -> dict[str, np.ndarray]:
  """Mines (anchor, nearest positive, semi-hard negatives) over a dataset.

  For each anchor: the nearest other example with the same pseudo-label is
  the positive; negatives (different label) satisfying the semi-hard
  condition are taken in random order, at most `max_negatives`. Anchors with
  no positive or no valid negative are dropped.

  Args:
    embeddings: (N, D) embeddings of the curated RGB train images.
    labels: (N,) int pseudo-labels.
    margin: triplet margin.
    max_negatives: K, negatives kept per anchor.
    rng: numpy Generator or seed for the random order of negatives.
    normalize: mine on L2-normalised embeddings (the loss's space). False
      reproduces the public code's mining on raw embeddings.
    chunk: anchors per distance block (bounds memory at chunk x N).

  Returns:
    dict of numpy arrays over the M kept anchors: 'anchor' (M,), 'positive'
    (M,), 'negatives' (M, K) indices into `embeddings` (padding repeats the
    first negative) and 'negative_mask' (M, K) bool.
  """
  emb = np.asarray(embeddings, np.float64)
  labels = np.asarray(labels)
  if emb.ndim != 2 or labels.shape != emb.shape[:1]:
    raise ValueError(
        f"embeddings must be (N, D) and labels (N,); found {emb.shape} and "
        f"{labels.shape}.")
  if max_negatives < 1:
    raise ValueError(f"max_negatives must be >= 1, found {max_negatives}.")
  if not isinstance(rng, np.random.Generator):
    rng = np.random.default_rng(rng)
  if normalize:
    emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  n = emb.shape[0]
  sq = np.sum(emb * emb, -1)
  out = {"anchor": [], "positive": [], "negatives": [], "negative_mask": []}
  for start in range(0, n, chunk):
    idx = np.arange(start, min(start + chunk, n))
    d = np.sqrt(np.maximum(sq[idx, None] + sq[None] - 2 * emb[idx] @ emb.T, 0))
    same = labels[idx, None] == labels[None]
    same[np.arange(len(idx)), idx] = False
    d_pos_all = np.where(same, d, np.inf)
    pos = np.argmin(d_pos_all, axis=1)
    d_p = d_pos_all[np.arange(len(idx)), pos]
    valid = (d > d_p[:, None]) & (d < d_p[:, None] + margin)
    valid &= labels[idx, None] != labels[None]
    valid &= np.isfinite(d_p)[:, None]
    # Random order among the valid candidates: sort random keys, invalid last.
    keys = np.where(valid, rng.random(valid.shape), np.inf)
    k = min(max_negatives, n)
    order = np.argsort(keys, axis=1)[:, :k]
    mask = np.take_along_axis(valid, order, axis=1)
    keep = mask[:, 0]
    if k < max_negatives:
      pad = max_negatives - k
      order = np.concatenate([order, np.repeat(order[:, :1], pad, 1)], 1)
      mask = np.concatenate([mask, np.zeros((len(idx), pad), bool)], 1)
    order = np.where(mask, order, order[:, :1])
    out["anchor"].append(idx[keep])
    out["positive"].append(pos[keep])
    out["negatives"].append(order[keep])
    out["negative_mask"].append(mask[keep])
  return {
      "anchor": np.concatenate(out["anchor"]).astype(np.int64),
      "positive": np.concatenate(out["positive"]).astype(np.int64),
      "negatives": np.concatenate(out["negatives"]).astype(np.int64).reshape(
          -1, max_negatives),
      "negative_mask": np.concatenate(out["negative_mask"]).reshape(
          -1, max_negatives),
  }


def online_semi_hard_triplet_loss(
    *,
    embeddings: jax.Array,
    labels: jax.Array,
    margin: float = 0.3,
    valid: jax.Array | None = None,
) -> jax.Array:
  """In-batch semi-hard triplet loss (jit-friendly: masks, static shapes).

  Every example is an anchor; its positive is the nearest other example
  with the same label; every different-label example meeting the semi-hard
  condition is a negative. Anchors without a positive contribute nothing.

  Args:
    embeddings: (N, D) embeddings (normalised here).
    labels: (N,) int pseudo-labels.
    margin: triplet margin.
    valid: optional (N,) bool, False for padding examples.

  Returns:
    Scalar: summed hinge over valid (anchor, negative) pairs / their count.
  """
  x = l2_normalize(embeddings.astype(jnp.float32))
  n = x.shape[0]
  ok = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  d = pairwise_distances(x, x)
  pair_ok = ok[:, None] & ok[None, :]
  same = (labels[:, None] == labels[None, :]) & ~jnp.eye(n, dtype=bool)
  same &= pair_ok
  d_pos = jnp.where(same, d, jnp.inf)
  pos = jnp.argmin(d_pos, axis=1)
  d_p = jnp.take_along_axis(d, pos[:, None], axis=1)[:, 0]
  has_pos = jnp.any(same, axis=1)
  neg = (labels[:, None] != labels[None, :]) & pair_ok
  mask = neg & semi_hard_negative_mask(
      d_positive=jax.lax.stop_gradient(d_p),
      d_negative=jax.lax.stop_gradient(d), margin=margin)
  mask &= has_pos[:, None]
  hinge = jnp.maximum(d_p[:, None] - d + margin, 0.0)
  maskf = mask.astype(jnp.float32)
  return jnp.sum(hinge * maskf) / jnp.maximum(jnp.sum(maskf), 1.0)


def dual_modality_triplet_loss(*, embeddings: jax.Array, mask: jax.Array,
                               margin: float) -> jax.Array:
  """EdgeVL stage 2: the triplet margin loss within each modality, summed.

  Args:
    embeddings: (M, B, 2 + K, D): M modalities of B groups (anchor,
      positive, K negatives), mined once for both modalities.
    mask: (B, 2 + K) validity of each group member.
    margin: triplet margin.

  Returns:
    Scalar: sum over the M modalities of `triplet_margin_loss`.
  """
  total = 0.0
  for e in embeddings:
    total = total + triplet_margin_loss(
        anchor=e[:, 0], positive=e[:, 1], negatives=e[:, 2:],
        negative_mask=mask[:, 2:] & mask[:, :1] & mask[:, 1:2], margin=margin)
  return total
