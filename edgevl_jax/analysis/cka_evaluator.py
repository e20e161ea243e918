"""CKA between teacher and student stages, as a training-time evaluator.

    ev = CKAEvaluator(teacher_fn, images=heldout, pairs=[(0, 3), (3, 3)])
    fn = features.stage_fn(student, kind='student')      # compiled once
    metrics.update(ev.run(fn, state.variables))   # {'cka/t0_s3': 0.41, ...}

The teacher features of the fixed held-out batch are computed once at
construction (the teacher is frozen); each `run` computes the student's
features on the same images, so the values are comparable across steps.
`t{i}` / `s{j}` index the teacher / student stage lists (0-based, in the
order the feature functions return them).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax.analysis import cka as cka_lib

FeatureFn = Callable[[jax.Array], Mapping[str, jax.Array]]


class CKAEvaluator:
  """CKA(teacher stage i, student stage j) on a fixed held-out batch.

  Args:
    teacher_fn: images -> {name: (B, p)} (e.g. `features.feature_fn`).
    images: (B, H, W, 3) held-out images, as `teacher_fn` expects them.
    pairs: (i, j) stage index pairs; None: every pair.
    kernel, unbiased, sigma: see `cka.cka`.
  """

  def __init__(self, teacher_fn: FeatureFn, *, images: Any,
               pairs: Sequence[tuple[int, int]] | None = None,
               kernel: str = "linear", unbiased: bool = False,
               sigma: float | None = None):
    self.images = jnp.asarray(images)
    if self.images.shape[0] < 4:
      raise ValueError(f"CKA needs a held-out batch of >= 4 images, got "
                       f"{self.images.shape[0]}.")
    self.teacher = list(jax.device_get(teacher_fn(self.images)).values())
    self.pairs = None if pairs is None else [tuple(p) for p in pairs]
    self.kernel, self.unbiased, self.sigma = kernel, unbiased, sigma
    cka_lib.cka(self.teacher[0][:4], self.teacher[0][:4], kernel=kernel,
                sigma=sigma)  # validates kernel/sigma up front
    self._cka = jax.jit(lambda x, y: cka_lib.cka(
        x, y, kernel=kernel, unbiased=unbiased, sigma=sigma))

  def _student(self, student_fn: Callable[..., Mapping[str, jax.Array]],
               variables: Any) -> list[jax.Array]:
    out = (student_fn(self.images) if variables is None
           else student_fn(variables, self.images))
    return list(out.values())

  def run(self, student_fn: Callable[..., Mapping[str, jax.Array]],
          variables: Any = None) -> dict[str, float]:
    """{'cka/t{i}_s{j}': value} for the student's current parameters.

    `student_fn` is images -> stages (`features.feature_fn`), or, with
    `variables`, (variables, images) -> stages (`features.stage_fn`).
    """
    student = self._student(student_fn, variables)
    pairs = self.pairs or [(i, j) for i in range(len(self.teacher))
                           for j in range(len(student))]
    out = {}
    for i, j in pairs:
      if not (0 <= i < len(self.teacher) and 0 <= j < len(student)):
        raise ValueError(f"CKA pair ({i}, {j}) out of range: "
                         f"{len(self.teacher)} teacher and {len(student)} "
                         f"student stages.")
      out[f"cka/t{i}_s{j}"] = float(self._cka(self.teacher[i], student[j]))
    return out

  def matrix(self, student_fn: Callable[..., Mapping[str, jax.Array]],
             variables: Any = None) -> np.ndarray:
    """The full (teacher stages, student stages) CKA matrix."""
    student = self._student(student_fn, variables)
    return np.array([[float(self._cka(t, s)) for s in student]
                     for t in self.teacher])
