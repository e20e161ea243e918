"""Zero-shot classification in CLIP's space, one modality at a time.

prediction = argmax softmax(100 * cos(image_embedding, text_embedding)); the
softmax does not change the argmax or the top-k, so accuracies are computed
on the cosine logits directly.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LOGIT_SCALE = 100.0


def check_embed_dim(embed_dim: int, text_features: np.ndarray | int, *,
                    student: str = "the student",
                    teacher: str = "the teacher's text features") -> None:
  """Refuses a student whose embedding size differs from the text features.

  Call it up front, before embedding any image: e.g. with the student
  meta's `embed_dim` and the (C, D) text feature matrix, or the teacher's
  `projection_dim` (an int) before computing the text features.

  Raises:
    ValueError: naming both sizes and the fix.
  """
  width = (int(text_features) if isinstance(text_features, (int, np.integer))
           else int(np.shape(text_features)[-1]))
  if int(embed_dim) != width:
    raise ValueError(
        f"{student} embeds images into {int(embed_dim)} dims but "
        f"{teacher} are {width}-dim; zero-shot compares the two by cosine, "
        f"so they must match: use a student built with embed_dim={width} "
        "(the teacher's projection_dim), or evaluate it with the teacher it "
        "was distilled from.")


def _check_features(image_features: np.ndarray,
                    text_features: np.ndarray) -> None:
  """Both (rows, D) with the same D; ValueError naming the two shapes."""
  img, txt = np.shape(image_features), np.shape(text_features)
  if len(img) != 2 or len(txt) != 2:
    raise ValueError(f"image_features {img} and text_features {txt} must "
                     "both be 2-D (N, D) and (C, D).")
  if img[1] != txt[1]:
    raise ValueError(
        f"image_features are {img[1]}-dim (shape {img}) but text_features "
        f"are {txt[1]}-dim (shape {txt}); the student's embed_dim must equal "
        "the teacher's projection_dim (check up front with "
        "zero_shot.check_embed_dim).")


def normalize_rows(x: np.ndarray) -> np.ndarray:
  """L2-normalises the rows of a (N, D) numpy array."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot_probabilities(
    image_features: np.ndarray, text_features: np.ndarray,
    *, logit_scale: float = LOGIT_SCALE) -> np.ndarray:
  """softmax(scale * cos) over classes.

  Args:
    image_features: (N, D) image embeddings (normalised here).
    text_features: (C, D) class text embeddings (normalised here).

  Returns:
    (N, C) float32 probabilities.
  """
  _check_features(image_features, text_features)
  logits = logit_scale * normalize_rows(image_features) @ normalize_rows(
      text_features).T
  logits = logits - logits.max(-1, keepdims=True)
  p = np.exp(logits)
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def topk_accuracy(
    image_features: np.ndarray, text_features: np.ndarray, labels: np.ndarray,
    *, ks: Sequence[int] = (1, 3, 5),
    class_ids: Sequence[int] | None = None) -> dict[str, float]:
  """Zero-shot top-k accuracies.

  Args:
    image_features: (N, D) image embeddings.
    text_features: (C, D) text embeddings of every class prompt.
    labels: (N,) int true labels in [0, C).
    ks: which top-k to report (k larger than C is clipped to C).
    class_ids: optional subset of classes the prediction may choose from.

  Returns:
    {'top1': .., 'top3': .., ...} fractions in [0, 1].
  """
  labels = np.asarray(labels)
  if len(labels) != len(image_features):
    raise ValueError(
        f"labels ({len(labels)}) and image_features ({len(image_features)}) "
        "must have the same length.")
  _check_features(image_features, text_features)
  sims = normalize_rows(image_features) @ normalize_rows(text_features).T
  if class_ids is not None:
    keep = np.full(sims.shape[1], -np.inf, np.float32)
    keep[np.asarray(class_ids)] = 0.0
    sims = sims + keep
  order = np.argsort(-sims, axis=1, kind="stable")
  out = {}
  for k in ks:
    k_eff = min(k, sims.shape[1])
    hit = np.any(order[:, :k_eff] == labels[:, None], axis=1)
    out[f"top{k}"] = float(hit.mean()) if len(hit) else 0.0
  return out


def embed_images(
    embed_fn: Callable[[jax.Array], jax.Array],
    images: np.ndarray,
    *, batch_size: int,
    sharding: jax.sharding.Sharding | None = None) -> np.ndarray:
  """Embeds a (N, H, W, 3) array in fixed-size batches (one compilation).

  The last batch is padded with zeros to `batch_size` so `embed_fn` (usually
  jitted) sees one shape; padded rows are dropped from the result.

  Args:
    embed_fn: maps (batch_size, H, W, 3) float32 images to (batch_size, D).
    images: (N, H, W, 3) images, already in the model's input normalisation.
    batch_size: rows per call (a multiple of the data-parallel size when
      `sharding` is given).
    sharding: optional sharding to `device_put` each batch with.

  Returns:
    (N, D) float32 numpy embeddings.
  """
  n = len(images)
  out = []
  for start in range(0, n, batch_size):
    chunk = np.asarray(images[start:start + batch_size], np.float32)
    valid = len(chunk)
    if valid < batch_size:
      pad = np.zeros((batch_size - valid,) + chunk.shape[1:], np.float32)
      chunk = np.concatenate([chunk, pad])
    x = jax.device_put(chunk, sharding) if sharding is not None else chunk
    out.append(np.asarray(jax.device_get(embed_fn(x)), np.float32)[:valid])
  if not out:
    return np.zeros((0, 0), np.float32)
  return np.concatenate(out)


def batched_embeddings(
    embed_fn: Callable[[jax.Array], jax.Array],
    batches: Iterable[np.ndarray]) -> np.ndarray:
  """Concatenates `embed_fn` over an iterable of image batches."""
  return np.concatenate(
      [np.asarray(jax.device_get(embed_fn(jnp.asarray(b))), np.float32)
       for b in batches])
