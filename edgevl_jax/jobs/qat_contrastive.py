"""Trainer 'qat_contrastive': EdgeVL stage 2, quantisation-aware contrastive.

Starts from the stage-1 student (`init_from`) rebuilt with int8 AQT fake
quantisation (dynamic ranges, STE); the params tree is the fp32 one, so the
stage-1 params load unchanged. No teacher. Positives share the teacher's
pseudo-label, negatives do not.

mining='offline' (paper): every epoch the current student mines semi-hard
triplets over the curated RGB train images (triplet_mining.py) and the
groups are reloaded with fresh augmentation in both modalities; the loss is
the triplet margin loss within each modality, summed over modalities.
mining='online': plain curated pair batches, semi-hard mining inside the
batch (`losses.online_semi_hard_triplet_loss`), accelerator friendly.

The public code's defects are fixed: mining uses the loss's normalised space
(`mining_space='unnormalized'` restores the original), gradients are fresh
every step (no accumulation), the student is in train mode.

Config keys: dataset, data_dir, data_config, init_from (a stage-1 workdir),
teacher (for the validation text features), pseudo_labels, image_size,
batch_size (anchors / groups), num_steps, optim, crop_scale, margin,
max_negatives, mining ('offline'|'online'), mining_space, quant
('int8'), eval_every, eval_batch_size, seed, log_every, ckpt_every, mesh.
Report: student_path, qat.{best_val_top1_rgb, best_val_top1_<other>,
best_step, loss, triplets_first_epoch}.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from edgevl_jax import data as data_lib
from edgevl_jax import losses
from edgevl_jax import quant
from edgevl_jax.eval import artefacts
from edgevl_jax.eval import splits
from edgevl_jax.train import checkpoint as checkpoint_lib
from edgevl_jax.train import checks
from edgevl_jax.train import config_utils
from edgevl_jax.train import dual_modality_kd as kd
from edgevl_jax.train import loop
from edgevl_jax.train import mesh as mesh_lib
from edgevl_jax.train import metrics as metrics_lib
from edgevl_jax.train import state as state_lib
from edgevl_jax.train import triplet_mining

MINING = ("offline", "online")
QUANT = {"int8": quant.int8, "none": None}


def validate_config(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("dataset", "data_dir", "init_from", "teacher", "pseudo_labels"):
    config_utils.require(config, key, types=str)
  for key in ("image_size", "batch_size", "num_steps", "eval_every",
              "max_negatives"):
    config_utils.require_positive(config, key, integer=True)
  config_utils.require_positive(config, "margin")
  config_utils.require(config, "mining", allowed=MINING)
  config_utils.require(config, "mining_space",
                       allowed=triplet_mining.MINING_SPACES)
  config_utils.require(config, "quant", allowed=tuple(QUANT))
  state_lib.validate_optim_config(config.optim)
  checks.dataset(config)
  checks.seed(config)
  checks.teacher_folder(config)
  checks.student_folder(config, "init_from")
  checks.student_fits_teacher(config, "init_from")
  checks.positive_ints(config, "eval_batch_size")
  checks.batch_fits_devices(
      config, minimum=2 if config.mining == "online" else 1,
      what="anchors (online mining needs a positive and a negative)")
  if config.mining == "online" and config.mining_space != "normalized":
    raise ValueError("config.mining_space='unnormalized' only applies to "
                     "mining='offline'; online mining works in the loss's "
                     "normalised space.")


def quant_spec(name: str) -> Any:
  factory = QUANT[name]
  return None if factory is None else factory()


def make_train_step(model: Any, norm: Any, *, margin: float, online: bool):
  """(state, batch) -> (state, metrics), to be jitted.

  Offline batches: 'rgb', 'other' (B, 2 + K, S, S, 3), 'mask' (B, 2 + K).
  Online batches: 'rgb', 'other' (B, S, S, 3), 'pseudo_label' (B,).
  Gradients are computed afresh each step; the student runs in train mode.
  """

  def embed_train(params, images, key):
    return model.apply({"params": params}, norm(images), train=True,
                       rngs={"dropout": key})

  def train_step(state, batch):
    key = state.step_key("dropout")
    if online:
      x = jnp.concatenate([batch["other"], batch["rgb"]])
      labels = batch["pseudo_label"]

      def loss_fn(params):
        e = embed_train(params, x, key).reshape(2, labels.shape[0], -1)
        return sum(losses.online_semi_hard_triplet_loss(
            embeddings=e[m], labels=labels, margin=margin) for m in range(2))
    else:
      b, g = batch["mask"].shape
      s = batch["rgb"].shape[2:]
      x = jnp.concatenate([batch["other"].reshape((b * g,) + s),
                           batch["rgb"].reshape((b * g,) + s)])

      def loss_fn(params):
        e = embed_train(params, x, key).reshape(2, b, g, -1)
        return triplet_mining.triplet_loss_both(e, batch["mask"],
                                                margin=margin)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    gnorm = optax.global_norm(grads)
    return state.apply_gradients(grads), {"loss": loss, "grad_norm": gnorm}

  return train_step


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Stage 2: int8 QAT with semi-hard triplets on pseudo-labels."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config_utils.get(config, "mesh", None))
  train_src = splits.load_source(config, "train")
  val_src = splits.load_source(config, "validation")
  info = train_src.info
  model, init_params, meta = artefacts.load_student(
      config.init_from, quant=quant_spec(config.quant))
  if int(meta["image_size"]) != config.image_size:
    raise ValueError(f"config.image_size={config.image_size} differs from the "
                     f"stage-1 student's image_size={meta['image_size']}.")
  teacher, t_params, tokenizer = artefacts.load_teacher(config.teacher)
  text = artefacts.text_features(teacher, t_params, tokenizer,
                                 info.class_names, info.prompt_templates[:1])
  del teacher, t_params
  indices, plabels = kd.curated_subset(config)
  norm = artefacts.normalizer(meta["normalization"])

  tx = state_lib.make_optimizer(config.optim, config.num_steps)
  state, state_sh = state_lib.create_train_state(
      lambda k: {"params": init_params}, tx, jax.random.key(config.seed),
      mesh=mesh, rules=kd.REPLICATED_RULES)
  batch_sh = mesh_lib.batch_sharding(mesh)
  margin = float(config.margin)
  online = config.mining == "online"

  train_step = make_train_step(model, norm, margin=margin, online=online)

  step_fn = mesh_lib.jit_sharded(
      train_step, in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=0)
  holder = {}

  crop = tuple(config.crop_scale)
  local_batch = mesh_lib.per_process_batch(config.batch_size)
  eval_bs = config.get("eval_batch_size", 256)
  if online:
    keys = ("rgb", "other", "pseudo_label")
    batches = iter(data_lib.paired_loader(
        train_src, batch_size=local_batch, image_size=config.image_size,
        train=True, seed=config.seed, indices=indices, pseudo_labels=plabels,
        crop_scale=crop))
  else:
    keys = ("rgb", "other", "mask")
    embed_eval = jax.jit(lambda p, x: model.apply({"params": p}, norm(x)))
    mine_fn = lambda params, epoch: triplet_mining.mine(
        functools.partial(embed_eval, params), train_src, indices=indices,
        pseudo_labels=plabels, image_size=config.image_size,
        batch_size=eval_bs, margin=margin,
        max_negatives=config.max_negatives, seed=config.seed * 104729 + epoch,
        mining_space=config.mining_space)
    batches = triplet_mining.EpochTriplets(
        mine_fn=mine_fn, current_params=lambda: holder["state"].params,
        make_loader=triplet_mining.make_triplet_loader(
            train_src, seed=config.seed, batch_size=local_batch,
            image_size=config.image_size, crop_scale=crop),
        batch_size=local_batch, workdir=workdir)
  prepare = lambda b: mesh_lib.shard_batch({k: b[k] for k in keys}, mesh)

  qmeta = {**meta, "quant": config.quant}
  best = dict(kd.artefacts_best(workdir))
  eval_cfg = config_utils.to_dict(config)
  eval_cfg["student"] = {"normalization": meta["normalization"]}
  eval_fn = kd.make_eval_fn(_Cfg(eval_cfg), model, val_src, text, workdir,
                            qmeta, best)
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.get("max_to_keep", checkpoint_lib.DEFAULT_MAX_TO_KEEP)) as ckpt, \
      metrics_lib.MetricWriter(workdir, total_steps=config.num_steps) as w:
    state, summary = loop.fit(
        state, step_fn, batches, num_steps=config.num_steps,
        checkpointer=ckpt, writer=w, log_every=config.get("log_every", 50),
        ckpt_every=config.get("ckpt_every", None), eval_fn=eval_fn,
        eval_every=config.eval_every, prepare_batch=prepare,
        on_state=lambda s: holder.update(state=s))
  metrics_lib.plot_curves(os.path.join(workdir, metrics_lib.METRICS_FILE),
                          os.path.join(workdir, "loss.png"),
                          title="QAT contrastive")
  first = getattr(batches, "num_triplets", [])
  return {"student_path": ".",
          "qat": {"best_val_top1_rgb": best.get("rgb"),
                  f"best_val_top1_{info.other_modality}": best.get("other"),
                  "best_step": best.get("step"), "loss": summary.get("loss"),
                  "triplets_first_epoch": first[0] if first else None}}


class _Cfg(dict):
  """Attribute access over a plain dict (for the shared eval function)."""

  def __getattr__(self, name: str) -> Any:
    value = self[name]
    return _Cfg(value) if isinstance(value, dict) else value
