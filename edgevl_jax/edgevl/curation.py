"""Pseudo-labels and curation: the confident part of the unlabelled train set.

The frozen teacher labels every RGB train image against a generic superset
vocabulary: p = softmax(100 cos(img, text)), label = argmax p, confidence =
max p (see the pseudo_labels job). `curate` keeps the most confident
fraction; the stages read their subset back with `curated_subset`.

File WORKDIR/pseudo_labels.npz: indices (kept positions in the train split,
most confident first), labels, confidences (of the kept), vocabulary, and
all_labels / all_confidences (every train example).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from edgevl_jax.utils import io

OUTPUT_FILE = "pseudo_labels.npz"


def curate(probabilities: np.ndarray, kept_fraction: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(kept indices most confident first, all labels, all confidences).

  Args:
    probabilities: (N, V) zero-shot probabilities over the vocabulary.
    kept_fraction: fraction of the N examples to keep (at least one).
  """
  labels = probabilities.argmax(-1).astype(np.int32)
  conf = probabilities.max(-1).astype(np.float32)
  keep = max(1, int(round(kept_fraction * len(conf))))
  order = np.argsort(-conf, kind="stable")[:keep]
  return order.astype(np.int64), labels, conf


def save(workdir: str, *, kept: np.ndarray, labels: np.ndarray,
         confidences: np.ndarray, vocabulary: np.ndarray) -> str:
  """Writes WORKDIR/pseudo_labels.npz atomically; returns its path."""
  path = os.path.join(workdir, OUTPUT_FILE)
  with io.atomic_path(path) as tmp:
    np.savez(tmp, indices=kept, labels=labels[kept],
             confidences=confidences[kept], all_labels=labels,
             all_confidences=confidences, vocabulary=vocabulary)
  return path


def load(path: str) -> dict[str, np.ndarray]:
  """Reads a pseudo_labels.npz (path to the file or to its workdir)."""
  if os.path.isdir(path):
    path = os.path.join(path, OUTPUT_FILE)
  if not os.path.exists(path):
    raise ValueError(f"pseudo labels {path!r} not found; run the "
                     "pseudo_labels stage first and pass its workdir.")
  try:
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable pseudo-label file ({e}); "
                     "delete its stage folder to label again.") from e


def curated_subset(path: str) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(indices, pseudo-labels) of the curated train subset at `path` (a
  pseudo_labels workdir or file), or (None, None) for '' (the whole split,
  unlabelled)."""
  if not path:
    return None, None
  labels = load(path)
  return labels["indices"], labels["labels"]


def subset_size(path: str) -> int | None:
  """Number of curated examples (None: no curation)."""
  indices, _ = curated_subset(path)
  return None if indices is None else int(len(indices))


def describe(config: Any) -> str:
  """'the curated subset of <path>' or 'the whole train split'."""
  return (f"the curated subset of {config.pseudo_labels}"
          if config.pseudo_labels else "the whole train split")
