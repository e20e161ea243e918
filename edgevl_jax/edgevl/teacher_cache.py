"""Teacher-embedding cache: K fixed augmented views, teacher run once.

Stage 1 spends most of its compute in the frozen teacher (1 B parameters in
the paper). Its input is a deterministic function of (seed, view, step):
`data.paired_loader` draws shuffling and augmentation from its seed and the
record position only. So the teacher embeddings of K fixed views of the
curated set are computed once (batch sharded over the mesh), stored under
WORKDIR/teacher_cache/, and epoch e replays view e % K: the same loader with
the same seed yields the same images, and each batch carries its cached
'teacher' (B, D) rows, so the train step runs the student only.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from edgevl_jax import data as data_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.utils import io

CACHE_DIR = "teacher_cache"


def view_seed(seed: int, view: int) -> int:
  """The loader seed of view `view` (distinct per view, fixed per run)."""
  return int(seed) * 1009 + int(view)


def view_loader(source: Any, *, view: int, seed: int, batch_size: int,
                image_size: int, indices: Sequence[int] | None,
                crop_scale: tuple[float, float]) -> Any:
  """One epoch (drop remainder) of augmented pairs of view `view`."""
  return data_lib.paired_loader(
      source, batch_size=batch_size, image_size=image_size, train=True,
      seed=view_seed(seed, view), num_epochs=1, indices=indices,
      crop_scale=crop_scale, shard_index=0, shard_count=1)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return num_examples // batch_size


def build(encode: Callable[[jax.Array], jax.Array], source: Any, *,
          workdir: str, num_views: int, seed: int, batch_size: int,
          image_size: int, indices: Sequence[int] | None,
          crop_scale: tuple[float, float],
          mesh: jax.sharding.Mesh) -> list[np.ndarray]:
  """Computes (or reads back) the cache: per view a (steps, B, D) array.

  Args:
    encode: jitted teacher, (B, S, S, 3) images in [0, 1] -> (B, D), taking
      a batch sharded over the mesh's batch axes.
    source, indices: the curated train split.
    workdir: the stage's folder (the cache lives in WORKDIR/teacher_cache).
    num_views: K.
    seed, batch_size, image_size, crop_scale: as the training loader.
    mesh: the batch is sharded over its data axes.
  """
  folder = os.path.join(workdir, CACHE_DIR)
  os.makedirs(folder, exist_ok=True)
  views = []
  for k in range(num_views):
    path = os.path.join(folder, f"view_{k}.npy")
    if os.path.exists(path):
      views.append(np.load(path))
      continue
    rows = []
    for batch in view_loader(source, view=k, seed=seed, batch_size=batch_size,
                             image_size=image_size, indices=indices,
                             crop_scale=crop_scale):
      rgb = mesh_lib.shard_batch(batch["rgb"], mesh)
      rows.append(np.asarray(jax.device_get(encode(rgb)), np.float32))
    arr = np.stack(rows)
    with io.atomic_path(path) as tmp:
      np.save(tmp, arr)
    views.append(arr)
  return views


class CachedBatches:
  """Replays the K views epoch by epoch, adding the cached 'teacher' rows.

  Its position is the step (get_state / set_state), so a resumed run sees
  exactly the batches of an uninterrupted one.
  """

  def __init__(self, views: list[np.ndarray], make_loader: Callable[[int],
                                                                     Any]):
    self.views = views
    self.make_loader = make_loader
    self.steps_per_epoch = int(views[0].shape[0])
    if self.steps_per_epoch == 0:
      raise ValueError("teacher cache holds no full batch; lower "
                       "config.batch_size or keep more examples.")
    self.step = 0
    self._it: Iterator[Any] | None = None
    self._it_pos = -1

  def get_state(self) -> dict[str, int]:
    return {"step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    self.step = int(state["step"])
    self._it = None

  def __iter__(self) -> "CachedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, i = divmod(self.step, self.steps_per_epoch)
    view = epoch % len(self.views)
    if self._it is None or i == 0 or self._it_pos != self.step:
      self._it = iter(self.make_loader(view))
      for _ in range(i):  # resume mid-epoch: skip the consumed batches
        next(self._it)
    batch = dict(next(self._it))
    batch["teacher"] = self.views[view][i]
    self.step += 1
    self._it_pos = self.step
    return batch
