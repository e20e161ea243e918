"""Streaming passes over a whole split: embeddings, labels, calibration data.

Every pass uses `data.embed_loader` (test-time resize, each example exactly
once, fixed batch shape so a jitted embedder compiles once).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from edgevl_jax import data as data_lib
from edgevl_jax.data import sources
from edgevl_jax.run import config as config_lib

# The data keys of every EdgeVL job.
DATA_SCHEMA: config_lib.Schema = {
    "dataset": config_lib.field("synthetic_rgbd", "EdgeVL paired dataset"),
    "data_dir": config_lib.field("workdirs/tfds", "TFDS data folder"),
    "data_config": config_lib.field(
        "", "builder config ('custom_<S>px_<train>_<val>_<test>' for the "
        "synthetic set) or the local source folder of a real dataset"),
}


def load_source(config: Any, split: str) -> Any:
  """`data.load_split` for the dataset keys of an EdgeVL stage config."""
  return sources.load_split(config.dataset, split, data_dir=config.data_dir,
                            config=config.data_config or None)


def embed_split(
    embed_fns: dict[str, Callable[[jax.Array], jax.Array]],
    source: Any, *, image_size: int, batch_size: int,
    modalities: Sequence[str] = ("rgb", "other"),
    indices: Sequence[int] | None = None,
) -> dict[str, Any]:
  """Embeds every example of `source` with each embedder, per modality.

  Args:
    embed_fns: name -> fn mapping (B, S, S, 3) images in [0, 1] to (B, D).
    source: a split from `data.load_split`.
    image_size: S.
    batch_size: B (the last batch is padded; padding is dropped).
    modalities: which images to embed ('rgb', 'other').
    indices: optional subset of positions.

  Returns:
    {'label': (N,), 'index': (N,), name: {modality: (N, D) float32}}.
  """
  loader = data_lib.embed_loader(
      source, batch_size=batch_size, image_size=image_size,
      modalities=tuple(modalities), indices=indices, shard_index=0,
      shard_count=1)
  out = {name: {m: [] for m in modalities} for name in embed_fns}
  labels, index = [], []
  for batch in loader:
    valid = np.asarray(batch["valid"], bool)
    labels.append(np.asarray(batch["label"])[valid])
    index.append(np.asarray(batch["index"])[valid])
    for name, fn in embed_fns.items():
      for m in modalities:
        emb = np.asarray(jax.device_get(fn(batch[m])), np.float32)
        out[name][m].append(emb[valid])
  result: dict[str, Any] = {"label": np.concatenate(labels),
                            "index": np.concatenate(index)}
  for name in embed_fns:
    result[name] = {m: np.concatenate(v) for m, v in out[name].items()}
  return result


def first_batches(source: Any, *, image_size: int, batch_size: int,
                  num_batches: int, seed: int,
                  indices: Sequence[int] | None = None,
                  crop_scale: tuple[float, float] = (0.08, 1.0)
                  ) -> list[dict[str, np.ndarray]]:
  """`num_batches` augmented training batches (e.g. for calibration)."""
  loader = data_lib.paired_loader(
      source, batch_size=batch_size, image_size=image_size, train=True,
      seed=seed, indices=indices, shard_index=0, shard_count=1,
      crop_scale=crop_scale)
  it = iter(loader)
  return [next(it) for _ in range(num_batches)]
