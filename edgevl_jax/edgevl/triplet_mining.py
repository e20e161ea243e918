"""Offline semi-hard triplet mining, once per epoch (EdgeVL stage 2).

At the start of every epoch the current student embeds every curated RGB
train image (test-time resize); `losses.offline_semi_hard_triplets` picks
for each anchor the nearest same-pseudo-label positive and up to K random
semi-hard negatives; `data.triplet_loader` then reloads the groups with
fresh augmentation in both modalities. The mined groups of each epoch are
stored in WORKDIR/triplets/ so a resumed run reuses them exactly.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from edgevl_jax import data as data_lib
from edgevl_jax import losses
from edgevl_jax.edgevl import splits
from edgevl_jax.utils import io

MINING_SPACES = ("normalized", "unnormalized")
TRIPLET_DIR = "triplets"


def mine(embed: Callable[[jax.Array], jax.Array], source: Any, *,
         indices: np.ndarray, pseudo_labels: np.ndarray, image_size: int,
         batch_size: int, margin: float, max_negatives: int, seed: int,
         mining_space: str = "normalized") -> np.ndarray:
  """Triplet groups (M, 2 + K) as positions in `source`, -1 = no negative.

  Args:
    embed: current student, (B, S, S, 3) images in [0, 1] -> (B, D).
    source: the full train split; `indices` the curated positions and
      `pseudo_labels` their labels (same order).
    margin, max_negatives: mining parameters (paper 0.3 and 3).
    seed: order of the negatives.
    mining_space: 'normalized' (the loss's space) or 'unnormalized' (the
      public code's raw embeddings).
  """
  if mining_space not in MINING_SPACES:
    raise ValueError(f"mining_space must be one of {MINING_SPACES}, found "
                     f"{mining_space!r}.")
  emb = splits.embed_split({"s": embed}, source, image_size=image_size,
                           batch_size=batch_size, modalities=("rgb",),
                           indices=indices)
  # embed_split keeps subset order; map rows back to curated positions.
  position = {int(p): i for i, p in enumerate(indices)}
  rows = np.asarray([position[int(p)] for p in emb["index"]])
  labels = np.asarray(pseudo_labels)[rows]
  mined = losses.offline_semi_hard_triplets(
      emb["s"]["rgb"], labels, margin=margin, max_negatives=max_negatives,
      rng=seed, normalize=mining_space == "normalized")
  pos = np.asarray(emb["index"], np.int64)
  negs = np.where(mined["negative_mask"], pos[mined["negatives"]], -1)
  return np.concatenate([pos[mined["anchor"]][:, None],
                         pos[mined["positive"]][:, None], negs], axis=1)


class EpochTriplets:
  """Batches of mined groups; mines again whenever an epoch is used up.

  `current_params()` returns the student variables to mine with (the train
  loop's latest state). Position = (epoch, step in epoch), checkpointable.
  """

  def __init__(self, *, mine_fn: Callable[[Any, int], np.ndarray],
               current_params: Callable[[], Any],
               make_loader: Callable[[np.ndarray, int], Any],
               batch_size: int, workdir: str):
    self.mine_fn, self.current_params = mine_fn, current_params
    self.make_loader, self.batch_size = make_loader, batch_size
    self.folder = os.path.join(workdir, TRIPLET_DIR)
    os.makedirs(self.folder, exist_ok=True)
    self.epoch, self.i = 0, 0
    self._it: Iterator[Any] | None = None
    self.num_triplets: list[int] = []

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "i": self.i}

  def set_state(self, state: dict[str, int]) -> None:
    self.epoch, self.i = int(state["epoch"]), int(state["i"])
    self._it = None

  def _triplets(self, epoch: int) -> np.ndarray:
    path = os.path.join(self.folder, f"epoch_{epoch}.npy")
    if os.path.exists(path):
      return np.load(path)
    groups = self.mine_fn(self.current_params(), epoch)
    if len(groups) < self.batch_size:
      raise ValueError(
          f"epoch {epoch}: mining found {len(groups)} triplet groups, fewer "
          f"than batch_size={self.batch_size}; raise kept_fraction or the "
          "margin, or lower batch_size.")
    with io.atomic_path(path) as tmp:
      np.save(tmp, groups)
    return groups

  def __iter__(self) -> "EpochTriplets":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self._it is None:
        groups = self._triplets(self.epoch)
        self.num_triplets.append(len(groups))
        self._it = iter(self.make_loader(groups, self.epoch))
        for _ in range(self.i):
          next(self._it)
      try:
        batch = next(self._it)
      except StopIteration:
        self.epoch, self.i, self._it = self.epoch + 1, 0, None
        continue
      self.i += 1
      return batch


def make_triplet_loader(source: Any, *, seed: int, batch_size: int,
                        image_size: int, crop_scale: Sequence[float]):
  """(groups, epoch) -> one epoch of freshly augmented triplet batches."""
  def make(groups: np.ndarray, epoch: int):
    return data_lib.triplet_loader(
        source, groups, batch_size=batch_size, image_size=image_size,
        seed=int(seed) * 7919 + epoch, num_epochs=1,
        crop_scale=tuple(crop_scale))
  return make
