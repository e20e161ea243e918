"""Image classification for the data-free tools: data, model, predict, load.

A classifier is `students.build(name, embed_dim=num_classes, **overrides)`:
a backbone (ResNet with the CIFAR stem by default) and a Linear head. The
classifier job trains them (the data-free teachers) and writes
MODEL_DIR/classifier.json + checkpoints; `load_classifier` reads one back.
Images are uint8 NHWC in memory; `normalize` maps them to [-1, 1].
"""
from __future__ import annotations

import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax.data import sklearn_digits
from edgevl_jax.data import sources
from edgevl_jax.models import students
from edgevl_jax.run import checkpoint as checkpoint_lib
from edgevl_jax.run import config as config_lib
from edgevl_jax.utils import io

f = config_lib.field
MODEL_SCHEMA: config_lib.Schema = {
    "name": f("resnet18", f"backbone, one of {students.NAMES}"),
    "overrides": f({}, "backbone fields (e.g. widths, cifar_stem)"),
}
AUGMENT_SCHEMA: config_lib.Schema = {
    "crop_padding": f(0, "pad-and-random-crop pixels (0: off)"),
    "flip": f(False, "random horizontal flip"),
}
del f

MODEL_FILE = "classifier.json"


def init_key(key: jax.Array) -> jax.Array:
  """An 'rbg' key from a raw threefry key, for `model.init`.

  XLA:CPU compiles one threefry sampler per parameter shape very slowly
  (minutes for a ~100-tensor model on a small CPU); rbg is ~8x faster.
  """
  return jax.random.wrap_key_data(
      jax.random.randint(key, (4,), 0, 2**31 - 1).astype(jnp.uint32),
      impl="rbg")


def normalize(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] NHWC -> float32 in [-1, 1] (the classifiers' input)."""
  return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def load_dataset(name: str, split: str, *, data_dir: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole split into memory: (images (N, H, W, 3) uint8, labels).

  'sklearn_digits' is prepared on first use; any other name must be a
  prepared TFDS dataset under `data_dir` with 'image' and 'label' features.
  """
  if name == "sklearn_digits":
    data = sklearn_digits.load(split, data_dir=data_dir)
    return data.images, data.labels
  source = sources.tfds_data_source(name, split, data_dir)
  records = [source[i] for i in range(len(source))]
  if not records or "image" not in records[0] or "label" not in records[0]:
    raise ValueError(f"Dataset {name!r} split {split!r} must have 'image' and "
                     "'label' features and at least one example.")
  return (np.stack([r["image"] for r in records]).astype(np.uint8),
          np.asarray([r["label"] for r in records], np.int32))


class EpochBatches:
  """Shuffled, augmented batches; its position is the step (checkpointable).

  Batch `s` is a pure function of (seed, s): epoch e = s // steps_per_epoch
  draws permutation (seed, e); augmentation draws from (seed, s). So a resumed
  run sees exactly the batches an uninterrupted one would.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *,
               batch_size: int, seed: int, crop_padding: int = 0,
               flip: bool = False):
    if len(images) < batch_size:
      raise ValueError(f"batch_size={batch_size} exceeds the {len(images)} "
                       "training examples; lower config.batch_size.")
    self.images, self.labels = images, labels
    self.batch_size, self.seed = batch_size, seed
    self.crop_padding, self.flip = crop_padding, flip
    self.steps_per_epoch = len(images) // batch_size
    self.step = 0

  def get_state(self) -> dict[str, int]:
    return {"step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    self.step = int(state["step"])

  def __iter__(self) -> "EpochBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, i = divmod(self.step, self.steps_per_epoch)
    perm = np.random.default_rng((self.seed, epoch)).permutation(
        len(self.images))
    idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
    images = self.images[idx]
    rng = np.random.default_rng((self.seed, epoch, i, 1))
    p = self.crop_padding
    if p:
      padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
      h, w = images.shape[1:3]
      dy, dx = rng.integers(0, 2 * p + 1, (2, len(idx)))
      images = np.stack([padded[j, y:y + h, x:x + w]
                         for j, (y, x) in enumerate(zip(dy, dx))])
    if self.flip:
      mask = rng.random(len(idx)) < 0.5
      images = np.where(mask[:, None, None, None], images[:, :, ::-1], images)
    self.step += 1
    return {"image": images, "label": self.labels[idx]}


def build_model(model_config: Any, num_classes: int) -> nn.Module:
  """The classifier {name, overrides} with a Linear(-> num_classes) head."""
  return students.build(model_config.name, embed_dim=num_classes,
                        **dict(model_config.overrides or {}))


def logits_and_features(model: nn.Module, variables: Any, images: jax.Array,
                        **kwargs: Any) -> tuple[Any, Any]:
  """(logits (B, K), pooled feature (B, C)) of a `build_model` classifier.

  kwargs go to `model.apply` (e.g. mutable=[...]); with `mutable` the result
  is ((logits, pooled), mutated).
  """
  def fn(m, x):
    pooled = m.backbone(x, train=False)["pooled"]
    return m.head(pooled), pooled
  return model.apply(variables, images, method=fn, **kwargs)


def predict_split(predict: Callable[[jax.Array], jax.Array],
                  images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Runs `predict(normalised images) -> (..., B, K)` over a split.

  Returns the concatenated logits (..., N, K) as numpy.
  """
  outs = []
  batch_size = min(batch_size, len(images))
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    n = len(chunk)
    # The last batch is zero-padded to full size: one compile per split.
    if n < batch_size:
      chunk = np.concatenate(
          [chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    outs.append(np.asarray(predict(normalize(jnp.asarray(chunk))))[..., :n, :])
  return np.concatenate(outs, axis=-2)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


def load_classifier(model_dir: str) -> tuple[nn.Module, dict[str, Any]]:
  """(model, variables) of a classifier trained by this trainer."""
  path = os.path.join(model_dir, MODEL_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{path} not found: {model_dir} is not a finished "
                     "classifier folder (run the 'classifier' stage first).")
  meta = io.read_json(path, required=("model", "num_classes"),
                      fix=f"re-train {model_dir} with the classifier job")
  model = students.build(meta["model"]["name"], embed_dim=meta["num_classes"],
                         **dict(meta["model"].get("overrides") or {}))
  variables = {"params": checkpoint_lib.load_params(model_dir),
               **checkpoint_lib.load_params(model_dir,
                                            collection="model_state")}
  return model, variables
