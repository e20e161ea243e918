"""Trainer 'classifier': supervised image classifiers (the data-free teachers).

Trains `config.num_models` independently seeded classifiers of one
architecture (CDFKD-MFS: three ResNet-34s, SGD lr 0.1, momentum 0.9, weight
decay 5e-4) on a TFDS classification dataset ('image' uint8 NHWC, 'label'),
one after the other, each in WORKDIR/model_<i>/ with its own checkpoints and
metrics.jsonl. A re-run resumes the unfinished model and skips finished ones.

A classifier is `students.build(name, embed_dim=num_classes, **overrides)`:
a backbone (ResNet with the CIFAR stem by default) and a Linear head, so the
data-free trainer reads it back with `load_classifier(model_dir)`.

Config keys: dataset, data_dir, image_size, model.{name, overrides},
num_models, seed, batch_size, num_epochs, optim (see `state.make_optimizer`),
augment.{crop_padding, flip}, log_every, ckpt_every.
Report: accuracy.teacher_each (list), accuracy.teacher_ensemble (mean
logits), model_dirs.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from edgevl_jax.models import students
from edgevl_jax.train import checkpoint as checkpoint_lib
from edgevl_jax.train import config_utils
from edgevl_jax.train import loop
from edgevl_jax.train import mesh as mesh_lib
from edgevl_jax.train import metrics as metrics_lib
from edgevl_jax.train import state as state_lib

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
    from edgevl_jax.data import sklearn_digits  # pylint: disable=g-import-not-at-top
    data = sklearn_digits.load(split, data_dir=data_dir)
    return data.images, data.labels
  from edgevl_jax.data import sources  # pylint: disable=g-import-not-at-top
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


def build_model(config: Any, num_classes: int) -> nn.Module:
  """The classifier of `config.model` with a Linear(-> num_classes) head."""
  overrides = dict(config_utils.get(config, "model.overrides", None) or {})
  return students.build(config.model.name, embed_dim=num_classes, **overrides)


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


def evaluate(predict: Callable[[jax.Array], jax.Array], images: np.ndarray,
             labels: np.ndarray, batch_size: int = 256) -> np.ndarray:
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
  del labels
  return np.concatenate(outs, axis=-2)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


def validate_config(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("dataset", "data_dir", "model.name"):
    config_utils.require(config, key)
  for key in ("num_models", "batch_size", "num_epochs"):
    config_utils.require_positive(config, key, integer=True)
  if config.model.name not in students.NAMES:
    raise ValueError(f"config.model.name={config.model.name!r} is not a "
                     f"student backbone; choose one of {students.NAMES}.")
  state_lib.validate_optim_config(config.optim)


class _Trainer:
  """Builds the optimiser, the jitted train step and the jitted predict once
  for all `num_models` classifiers (one compile instead of one per model:
  the models share architecture, optimiser and shardings)."""

  def __init__(self, config: Any, model: nn.Module, train: tuple,
               mesh: jax.sharding.Mesh):
    self.config, self.model, self.mesh = config, model, mesh
    images = train[0]
    self.steps_per_epoch = len(images) // config.batch_size
    self.num_steps = self.steps_per_epoch * config.num_epochs
    self.tx = state_lib.make_optimizer(config.optim, self.num_steps)
    dummy = jnp.zeros((1,) + images.shape[1:], jnp.float32)
    self.init_fn = lambda k: model.init(init_key(k), dummy,
                                        mutable=["params", "batch_stats"])
    self.predict = jax.jit(model.apply)
    self._step = None

  def step(self, state_sh: Any) -> Callable[..., Any]:
    """The jitted train step (built on first use, then reused)."""
    if self._step is None:
      model, mesh = self.model, self.mesh

      def train_step(state, batch):
        def loss_fn(params):
          logits, mutated = model.apply(
              {"params": params, **state.model_state},
              normalize(batch["image"]), train=True, mutable=["batch_stats"])
          loss = optax.softmax_cross_entropy_with_integer_labels(
              logits, batch["label"]).mean()
          acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
          return loss, (mutated, acc)
        (loss, (mutated, acc)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads, model_state=dict(mutated))
        return state, {"loss": loss, "train_accuracy": acc}

      self._step = mesh_lib.jit_sharded(
          train_step, in_shardings=(state_sh, mesh_lib.batch_sharding(mesh)),
          out_shardings=(state_sh, mesh_lib.replicated(mesh)),
          donate_argnums=0)
    return self._step


def _train_one(config: Any, trainer: _Trainer, train: tuple, test: tuple,
               model_dir: str, seed: int) -> np.ndarray:
  """Trains one classifier in `model_dir`; returns its test logits."""
  images, labels = train
  mesh = trainer.mesh
  batches = EpochBatches(
      images, labels, batch_size=config.batch_size, seed=seed,
      crop_padding=int(config_utils.get(config, "augment.crop_padding", 0)),
      flip=bool(config_utils.get(config, "augment.flip", False)))
  num_steps = trainer.num_steps
  state, state_sh = state_lib.create_train_state(
      trainer.init_fn, trainer.tx, jax.random.PRNGKey(seed), mesh=mesh)
  step = trainer.step(state_sh)
  with checkpoint_lib.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                   max_to_keep=config.get("max_to_keep", checkpoint_lib.DEFAULT_MAX_TO_KEEP)) as ckpt, \
      metrics_lib.MetricWriter(model_dir, total_steps=num_steps,
                               tensorboard=False) as writer:
    state, _ = loop.fit(
        state, step, batches, num_steps=num_steps, checkpointer=ckpt,
        writer=writer, log_every=int(config_utils.get(config, "log_every", 50)),
        ckpt_every=config_utils.get(config, "ckpt_every", None),
        prepare_batch=functools.partial(mesh_lib.shard_batch, mesh=mesh))
  logits = evaluate(functools.partial(trainer.predict, state.variables), *test)
  writer_line = {"test_accuracy": accuracy(logits, test[1])}
  with open(os.path.join(model_dir, MODEL_FILE), "w") as f:
    json.dump({"model": config_utils.to_dict(config.model),
               "num_classes": int(logits.shape[-1]), **writer_line}, f)
  return logits


def load_classifier(model_dir: str) -> tuple[nn.Module, dict[str, Any]]:
  """(model, variables) of a classifier trained by this trainer."""
  path = os.path.join(model_dir, MODEL_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{path} not found: {model_dir} is not a finished "
                     "classifier folder (run the 'classifier' stage first).")
  with open(path) as f:
    meta = json.load(f)
  model = students.build(meta["model"]["name"], embed_dim=meta["num_classes"],
                         **dict(meta["model"].get("overrides") or {}))
  variables = {"params": checkpoint_lib.load_params(model_dir),
               **checkpoint_lib.load_params(model_dir,
                                            collection="model_state")}
  return model, variables


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains the classifiers; returns their test accuracies."""
  validate_config(config)
  mesh = mesh_lib.make_mesh(config_utils.get(config, "mesh", None))
  train = load_dataset(config.dataset, "train", data_dir=config.data_dir)
  test = load_dataset(config.dataset, "test", data_dir=config.data_dir)
  num_classes = int(config_utils.get(config, "num_classes", 0)) or int(
      max(train[1].max(), test[1].max()) + 1)
  trainer = _Trainer(config, build_model(config, num_classes), train, mesh)
  all_logits, dirs = [], []
  for i in range(config.num_models):
    model_dir = os.path.join(workdir, f"model_{i}")
    dirs.append(os.path.relpath(model_dir, workdir))
    all_logits.append(_train_one(config, trainer, train, test, model_dir,
                                 int(config.seed) + 1000 * i))
  each = [accuracy(l, test[1]) for l in all_logits]
  ensemble = accuracy(np.mean(all_logits, axis=0), test[1])
  return {"accuracy": {"teacher_each": each, "teacher_ensemble": ensemble},
          "model_dirs": dirs}
