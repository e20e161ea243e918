"""Pseudo-labels and curation: the confident part of the unlabelled train set.

The frozen teacher labels every RGB train image against a generic superset
vocabulary: p = softmax(100 cos(img, text)), label = argmax p, confidence =
max p (see the pseudo_labels job). `curate` keeps the most confident
fraction; the stages read their subset back with `curated_subset`.

File WORKDIR/pseudo_labels.npz: indices (kept positions in the train split,
most confident first), labels, confidences (of the kept), vocabulary, and
all_labels / all_confidences (every train example).

Each stage may keep its own fraction of the same labelled split (the
reference configs curate stage 1 and stage 2 differently, e.g. ScanNet Swin
0.20 / 0.25): `curated_subset(path, kept_fraction)` re-ranks
all_confidences; 0 takes the pseudo_labels stage's own subset.
`STAGE_SCHEMA` holds the per-stage keys (kept fraction and epochs) and
`stage_schedule` turns epochs over the stage's own subset into steps.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from edgevl_jax.run import config as config_lib
from edgevl_jax.utils import io

OUTPUT_FILE = "pseudo_labels.npz"
f = config_lib.field
# Keys of a training stage over the curated subset (dual_modality_kd,
# qat_contrastive).
STAGE_SCHEMA: config_lib.Schema = {
    "kept_fraction": f(0.0, "this stage's most confident fraction of the "
                       "pseudo-labelled train split, in (0, 1]; 0: the "
                       "pseudo_labels stage's own subset"),
    "epochs": f(0.0, "epochs over this stage's subset; > 0 sets num_steps "
                "= ceil(epochs x steps per epoch), steps per epoch = "
                "subset size // batch_size (num_steps is then ignored)"),
}
del f


def _most_confident(confidences: np.ndarray, kept_fraction: float
                    ) -> np.ndarray:
  keep = max(1, int(round(kept_fraction * len(confidences))))
  return np.argsort(-confidences, kind="stable")[:keep].astype(np.int64)


def curate(probabilities: np.ndarray, kept_fraction: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(kept indices most confident first, all labels, all confidences).

  Args:
    probabilities: (N, V) zero-shot probabilities over the vocabulary.
    kept_fraction: fraction of the N examples to keep (at least one).
  """
  labels = probabilities.argmax(-1).astype(np.int32)
  conf = probabilities.max(-1).astype(np.float32)
  return _most_confident(conf, kept_fraction), labels, conf


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


def curated_subset(path: str, kept_fraction: float = 0.0
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(indices most confident first, pseudo-labels) of a curated subset.

  Args:
    path: a pseudo_labels workdir or file; '' gives (None, None): the whole
      split, unlabelled.
    kept_fraction: > 0: this fraction of the labelled split, re-ranked by
      confidence (1.0: every example, no curation); 0: the pseudo_labels
      stage's own subset.
  """
  if not path:
    return None, None
  labels = load(path)
  if kept_fraction:
    order = _most_confident(labels["all_confidences"], float(kept_fraction))
    return order, labels["all_labels"][order]
  return labels["indices"], labels["labels"]


def subset_size(path: str, kept_fraction: float = 0.0) -> int | None:
  """Number of curated examples (None: no curation)."""
  indices, _ = curated_subset(path, kept_fraction)
  return None if indices is None else int(len(indices))


def validate_stage(config: Any) -> None:
  """Checks the STAGE_SCHEMA keys of a stage config (no compute)."""
  config_lib.require(config, "kept_fraction", types=(float, int),
                     check=lambda v: 0 <= v <= 1, expected="in [0, 1]")
  config_lib.require(config, "epochs", types=(float, int),
                     check=lambda v: v >= 0, expected=">= 0")
  if config.kept_fraction and not config.pseudo_labels:
    raise ValueError(
        f"config.kept_fraction={config.kept_fraction} needs "
        "config.pseudo_labels (the labelled split to keep a fraction of); "
        "set pseudo_labels or kept_fraction=0.")


def stage_schedule(config: Any, num_examples: int) -> dict[str, Any]:
  """{'num_steps', 'steps_per_epoch', 'epochs'} of a stage.

  steps_per_epoch = num_examples // config.batch_size (at least 1: the
  loaders drop the remainder); with config.epochs > 0, num_steps =
  ceil(epochs x steps_per_epoch), otherwise config.num_steps and epochs
  is what those steps amount to.
  """
  per_epoch = max(1, int(num_examples) // int(config.batch_size))
  if config.epochs:
    steps = max(1, math.ceil(float(config.epochs) * per_epoch))
  else:
    steps = int(config.num_steps)
  return {"num_steps": steps, "steps_per_epoch": per_epoch,
          "epochs": steps / per_epoch, "examples": int(num_examples)}


def describe(config: Any) -> str:
  """'the curated subset of <path>' or 'the whole train split'."""
  return (f"the curated subset of {config.pseudo_labels}"
          if config.pseudo_labels else "the whole train split")
