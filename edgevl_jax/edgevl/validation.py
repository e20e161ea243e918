"""Model selection of the EdgeVL stages: zero-shot top-1 on validation.

Never on test (the public code selects on test; the spec forbids it). The
selected student is the one with the best mean of the two modalities'
validation top-1; `keep_best_student` saves it as the stage's hand-off
(student.json + student_params.msgpack).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np

from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import splits
from edgevl_jax.edgevl import zero_shot
from edgevl_jax.run import evaluators

SELECTION_METRIC = "val_top1_mean"


class ZeroShotValidation:
  """Zero-shot top-1 of the student per modality on a validation split.

  Args:
    apply_fn: (variables, images normalised) -> (B, D) embeddings.
    source: the validation split.
    text: (C, D) class text features of the teacher.
    image_size, batch_size: of the embedding pass.
    normalization: the student's input normalisation.

  `run(state)` returns {'val_top1_rgb', 'val_top1_<other>', 'val_top1_mean'}.
  """

  def __init__(self, apply_fn: Callable[[Any, jax.Array], jax.Array],
               source: Any, text: np.ndarray, *, image_size: int,
               batch_size: int, normalization: str):
    norm = handoff.normalizer(normalization)
    self._encode = jax.jit(lambda v, x: apply_fn(v, norm(x)))
    self.source, self.text = source, text
    self.image_size, self.batch_size = image_size, batch_size

  def run(self, state: Any) -> Mapping[str, float]:
    emb = splits.embed_split(
        {"s": functools.partial(self._encode, state.variables)}, self.source,
        image_size=self.image_size, batch_size=self.batch_size)
    acc = {m: zero_shot.topk_accuracy(emb["s"][m], self.text,
                                      emb["label"])["top1"]
           for m in ("rgb", "other")}
    return {"val_top1_rgb": acc["rgb"],
            f"val_top1_{self.source.modality}": acc["other"],
            SELECTION_METRIC: 0.5 * (acc["rgb"] + acc["other"])}


def keep_best_student(workdir: str, meta: Mapping[str, Any]
                      ) -> evaluators.KeepBest:
  """Saves the student as the stage's hand-off when the mean improves."""

  def save(state: Any, record: Mapping[str, Any]) -> None:
    del record
    handoff.save_student(workdir, meta=meta, params=state.params,
                         model_state=state.model_state)

  return evaluators.KeepBest(workdir, SELECTION_METRIC, save)


def best_report(best: evaluators.KeepBest, other: str) -> dict[str, Any]:
  """The selected student's validation numbers, for report.json."""
  results = best.record.get("results", {})
  return {"best_val_top1_rgb": results.get("val_top1_rgb"),
          f"best_val_top1_{other}": results.get(f"val_top1_{other}"),
          "best_step": best.record.get("step")}
