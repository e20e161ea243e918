"""Trainer 'dual_modality_kd': EdgeVL stage 1, distilling CLIP into a student.

Per step, B co-registered pairs of the curated subset (the same crop and flip
on both images): the frozen teacher embeds the RGB images, the student embeds
the 2B images [non-RGB; RGB] in one forward pass, and both halves are pulled
to [t; t] (`losses.dual_modality_kd_loss`, L1 by default). Ablations:
`student_inputs='rgb'` or `'other'` feed one modality only (target still the
RGB teacher). With `teacher_cache.num_views > 0` the teacher embeddings of K
fixed views are precomputed once (teacher_cache.py) and steps run the
student only.

Sharding: one jitted step with explicit in/out shardings and donation; the
batch is split over ('data', 'fsdp'), the student is replicated or
fsdp-sharded (`student_sharding`), the teacher is fsdp-sharded from its
logical axes. Model selection: zero-shot top-1 on the validation split (mean
of both modalities), never on test; the selected params are written with
`artefacts.save_student`.

Config keys: dataset, data_dir, data_config, teacher, teacher_normalization,
student.{name, overrides, normalization, hf_path}, pseudo_labels (workdir or
'' for the whole train split), image_size, batch_size, num_steps, optim,
crop_scale, kd_loss ('l1'|'l2'|'cosine'), student_inputs ('both'|'rgb'|'other'),
teacher_cache.num_views (0 = off), student_sharding ('replicated'|'fsdp'),
eval_every, eval_batch_size, seed, log_every, ckpt_every, mesh.
Report: student_path, kd.{best_val_top1_rgb, best_val_top1_<other>,
best_step, loss}.

ImageNet initialisation: `student.hf_path` (a local Hugging Face ViT / Swin /
ResNet / MobileNetV2 folder; '' or absent = from scratch) gives the backbone
its weights (`students.load_hf`; the head to D stays freshly initialised).
The folder's config.json must agree with student.name and its overrides, and
student.json records the loaded architecture in full, so later stages
rebuild exactly that model.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import numpy as np

from edgevl_jax import data as data_lib
from edgevl_jax import losses
from edgevl_jax.eval import artefacts
from edgevl_jax.eval import splits
from edgevl_jax.eval import zero_shot
from edgevl_jax.models import layers
from edgevl_jax.models import students
from edgevl_jax.models.mobilenet import MobileNetV2
from edgevl_jax.models.resnet import ResNet
from edgevl_jax.models.swin import Swin
from edgevl_jax.models.vit import ViT
from edgevl_jax.train import checkpoint as checkpoint_lib
from edgevl_jax.train import checks
from edgevl_jax.train import config_utils
from edgevl_jax.train import loop
from edgevl_jax.train import mesh as mesh_lib
from edgevl_jax.train import metrics as metrics_lib
from edgevl_jax.train import pseudo_labels as pseudo_labels_lib
from edgevl_jax.train import state as state_lib
from edgevl_jax.train import teacher_cache

STUDENT_INPUTS = ("both", "rgb", "other")
# Every weight axis replicated; only the batch is split.
REPLICATED_RULES = tuple((name, None) for name, _ in layers.LOGICAL_AXIS_RULES
                         if name != layers.BATCH) + (
                             (layers.BATCH, mesh_lib.BATCH_AXES),)
# Hugging Face model_type -> the backbone class its weights fit.
HF_BACKBONES = {"vit": ViT, "swin": Swin, "resnet": ResNet,
                "mobilenet_v2": MobileNetV2}
# config.json field behind a student field, where the names differ.
_HF_FIELDS = {
    "vit": dict(width="hidden_size", depth="num_hidden_layers",
                num_heads="num_attention_heads", mlp_dim="intermediate_size"),
    "swin": dict(width="embed_dim"),
    "resnet": dict(stage_sizes="depths", widths="hidden_sizes",
                   stem_width="embedding_size"),
    "mobilenet_v2": dict(width="depth_multiplier", divisor="depth_divisible_by",
                         bn_epsilon="layer_norm_eps"),
}
# Numerics that come with the weights (e.g. HF ViT's LayerNorm eps 1e-12):
# adopted unless config.student.overrides sets them, then they must agree.
_ADOPTED = ("layer_norm_eps", "bn_epsilon", "qkv_bias")
# A training setting, not architecture: the config's value is kept.
_NOT_FROM_HF = ("drop_path_rate",)


def hf_path(config: Any) -> str:
  """config.student.hf_path, '' when absent (training from scratch)."""
  return config_utils.get(config, "student.hf_path", "") or ""


def _config_overrides(config: Any) -> dict[str, Any]:
  overrides = dict(config_utils.get(config, "student.overrides", None) or {})
  overrides.setdefault("image_size", config.image_size)
  return overrides


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
    return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
            and len(a) == len(b) and all(map(_same, a, b)))
  return a == b


def hf_overrides(config: Any) -> dict[str, Any]:
  """Student overrides describing the model in config.student.hf_path.

  The checkpoint's architecture fields (from its config.json), with
  config.student.overrides on top; every field config.student.name or its
  overrides fix must equal the checkpoint's. Reads config.json only.

  Raises:
    ValueError: the folder is missing, holds an unsupported model, or its
      architecture disagrees with config.student (naming both values).
  """
  path = hf_path(config)
  if not os.path.isdir(path):
    raise ValueError(
        f"config.student.hf_path={path!r} is not a folder; pass a local "
        "Hugging Face model folder (config.json + weights) or '' to train "
        "from scratch.")
  hf_cfg = students.read_hf_config(path)
  family = hf_cfg.get("model_type")
  hf = students.hf_overrides(hf_cfg, path)
  name = config.student.name
  explicit = dict(config_utils.get(config, "student.overrides", None) or {})
  overrides = _config_overrides(config)
  backbone = students.build(name, embed_dim=None, **overrides).backbone
  if not isinstance(backbone, HF_BACKBONES[family]):
    fits = [n for n in students.NAMES if isinstance(
        students.build(n, embed_dim=None).backbone, HF_BACKBONES[family])]
    raise ValueError(
        f"config.student.hf_path={path!r} holds a {family!r} model "
        f"(config.json model_type) but config.student.name={name!r} is a "
        f"{type(backbone).__name__}; choose one of {fits}.")
  problems = []
  for key, value in hf.items():
    if key in _NOT_FROM_HF or (key in _ADOPTED and key not in explicit):
      continue
    mine = getattr(backbone, key)
    if key == "mlp_dim" and mine is None:
      mine = 4 * backbone.width
    if not _same(value, mine):
      source = ("config.student.overrides" if key in explicit else
                "config.image_size" if key == "image_size" else
                f"config.student.name={name!r}")
      field = _HF_FIELDS[family].get(key, key)
      problems.append(f"HF config.json says {field}={value!r}, {source} "
                      f"gives {key}={mine!r}")
  if problems:
    raise ValueError(
        f"config.student.hf_path={path!r} does not match config.student: "
        + "; ".join(problems) + ". Set config.student.overrides (and "
        "config.image_size) to the checkpoint's values or pick a matching "
        "config.student.name.")
  return {**{k: v for k, v in hf.items() if k not in _NOT_FROM_HF},
          **overrides}


def validate_student(config: Any) -> None:
  """Checks config.student.{name, overrides, normalization, hf_path}."""
  config_utils.require(config, "student.name", allowed=students.NAMES)
  config_utils.require(config, "student.normalization",
                       allowed=("clip", "imagenet"))
  overrides = dict(config_utils.get(config, "student.overrides", None) or {})
  allowed = students.allowed_overrides(config.student.name)
  unknown = sorted(set(overrides) - set(allowed))
  if unknown:
    raise ValueError(f"config.student.overrides has unknown keys {unknown} "
                     f"for {config.student.name!r}; allowed: "
                     f"{sorted(allowed)}.")
  size = overrides.get("image_size")
  if size is not None and size != config.image_size:
    raise ValueError(
        f"config.student.overrides.image_size={size} differs from "
        f"config.image_size={config.image_size}; make them equal.")
  if config_utils.get(config, "student.hf_path", None) is not None:
    config_utils.require(config, "student.hf_path", types=str)
  if hf_path(config):
    hf_overrides(config)


def validate_config(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("dataset", "data_dir", "teacher"):
    config_utils.require(config, key, types=str)
  for key in ("image_size", "batch_size", "num_steps", "eval_every"):
    config_utils.require_positive(config, key, integer=True)
  config_utils.require(config, "teacher_normalization",
                       allowed=("clip", "imagenet"))
  config_utils.require(config, "kd_loss", allowed=losses.distill.KD_KINDS)
  config_utils.require(config, "student_inputs", allowed=STUDENT_INPUTS)
  config_utils.require(config, "student_sharding",
                       allowed=("replicated", "fsdp"))
  config_utils.require(config, "teacher_cache.num_views", types=int,
                       check=lambda v: v >= 0, expected=">= 0")
  validate_student(config)
  state_lib.validate_optim_config(config.optim)
  checks.dataset(config)
  checks.seed(config)
  checks.teacher_folder(config)
  checks.positive_ints(config, "eval_batch_size")
  checks.batch_fits_devices(config)


def student_meta(config: Any, embed_dim: int) -> dict[str, Any]:
  """The student.json dict for `artefacts.save_student`.

  With config.student.hf_path, overrides hold the checkpoint's architecture.
  """
  overrides = (hf_overrides(config) if hf_path(config)
               else _config_overrides(config))
  return {"name": config.student.name, "embed_dim": int(embed_dim),
          "overrides": overrides,
          "normalization": config.student.normalization,
          "image_size": int(config.image_size)}


def student_init_fn(config: Any, model: students.Student,
                    meta: dict[str, Any], rng: jax.Array):
  """key -> initial variables for `state.create_train_state`.

  From scratch: `model.init`. With config.student.hf_path: the checkpoint's
  backbone and a head to meta['embed_dim'] initialised from `rng`, loaded
  once here (the key passed to the returned function is then unused).

  Raises:
    ValueError: the loaded variables do not fit `model` (its parameter tree
      or shapes differ).
  """
  dummy = jnp.zeros((1, config.image_size, config.image_size, 3))
  if not hf_path(config):
    return lambda k: model.init(k, dummy)
  _, loaded = students.load_hf(hf_path(config), embed_dim=meta["embed_dim"],
                               rng=rng, **meta["overrides"])
  loaded = {c: v for c, v in loaded.items() if c in ("params", "batch_stats")}
  shape = lambda t: jax.tree.map(lambda x: tuple(x.shape), nn.unbox(t))
  expected = jax.eval_shape(model.init, rng, dummy)
  expected = {c: expected[c] for c in loaded}
  if shape(expected) != shape(loaded):
    raise ValueError(
        f"config.student.hf_path={hf_path(config)!r}: the loaded variables do "
        f"not fit the student described by student.json ({meta['name']!r}, "
        f"{meta['overrides']}).")
  return lambda k: loaded


def curated_subset(config: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(indices, pseudo-labels) of the curated train subset, or (None, None)."""
  path = config_utils.get(config, "pseudo_labels", "")
  if not path:
    return None, None
  pl = pseudo_labels_lib.load(path)
  return pl["indices"], pl["labels"]


def student_inputs(other: jax.Array, rgb: jax.Array, mode: str) -> jax.Array:
  """[non-RGB; RGB] (2B, ...), or one modality (B, ...) for the ablations."""
  if mode == "both":
    return jnp.concatenate([other, rgb])
  return rgb if mode == "rgb" else other


def make_eval_fn(config: Any, model: Any, val_src: Any, text: np.ndarray,
                 workdir: str, meta: dict[str, Any], best: dict[str, Any]):
  """Validation zero-shot top-1; saves the student when the mean improves."""
  norm = artefacts.normalizer(config.student.normalization)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, norm(x)))
  other = val_src.modality

  def eval_fn(state):
    params = state.params
    emb = splits.embed_split({"s": functools.partial(encode, params)},
                             val_src, image_size=config.image_size,
                             batch_size=config.get("eval_batch_size", 256))
    acc = {m: zero_shot.topk_accuracy(emb["s"][m], text, emb["label"])["top1"]
           for m in ("rgb", "other")}
    score = 0.5 * (acc["rgb"] + acc["other"])
    step = int(jax.device_get(state.step))
    if score > best.get("score", -1.0):
      best.update(score=score, step=step, rgb=acc["rgb"], other=acc["other"])
      artefacts.save_student(workdir, meta=meta, params=params,
                             extra={"best": dict(best)})
    return {"val_top1_rgb": acc["rgb"], f"val_top1_{other}": acc["other"]}

  return eval_fn


def _encode_teacher(teacher, t_norm, tp, rgb):
  return teacher.apply({"params": tp}, t_norm(rgb), method="encode_image")


def make_train_step(model: Any, teacher: Any, *, kind: str, mode: str,
                    t_norm: Any, s_norm: Any):
  """(state, teacher_params, batch) -> (state, metrics), to be jitted.

  batch: 'rgb', 'other' (B, S, S, 3) in [0, 1], and optionally 'teacher'
  (B, D) cached teacher embeddings (then the teacher is not run).
  """

  def train_step(state, tp, batch):
    if "teacher" in batch:
      t = batch["teacher"]
    else:
      t = jax.lax.stop_gradient(
          _encode_teacher(teacher, t_norm, tp, batch["rgb"]))
    x = s_norm(student_inputs(batch["other"], batch["rgb"], mode))

    def loss_fn(params):
      s = model.apply({"params": params}, x, train=True,
                      rngs={"dropout": state.step_key("dropout")})
      return losses.dual_modality_kd_loss(student_embeddings=s,
                                          teacher_embeddings=t, kind=kind)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    gnorm = optax.global_norm(grads)
    return state.apply_gradients(grads), {"loss": loss, "grad_norm": gnorm}

  return train_step


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Stage 1: distils the teacher into the student on both modalities."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config_utils.get(config, "mesh", None))
  train_src = splits.load_source(config, "train")
  val_src = splits.load_source(config, "validation")
  info = train_src.info
  teacher, t_params, tokenizer = artefacts.load_teacher(config.teacher,
                                                        mesh=mesh)
  t_sh = mesh_lib.tree_shardings(t_params)
  text = artefacts.text_features(teacher, t_params, tokenizer,
                                 info.class_names, info.prompt_templates[:1])
  embed_dim = teacher.config.projection_dim
  meta = student_meta(config, embed_dim)
  model = artefacts.build_student(meta)
  t_norm = artefacts.normalizer(config.teacher_normalization)
  s_norm = artefacts.normalizer(config.student.normalization)
  indices, _ = curated_subset(config)

  tx = state_lib.make_optimizer(config.optim, config.num_steps)
  rules = (REPLICATED_RULES if config.student_sharding == "replicated"
           else layers.LOGICAL_AXIS_RULES)
  init_fn = student_init_fn(
      config, model, meta, jax.random.fold_in(jax.random.key(config.seed), 1))
  state, state_sh = state_lib.create_train_state(
      init_fn, tx, jax.random.key(config.seed), mesh=mesh, rules=rules)
  batch_sh = mesh_lib.batch_sharding(mesh)
  rep = mesh_lib.replicated(mesh)
  mode, kind = config.student_inputs, config.kd_loss

  encode_teacher = functools.partial(_encode_teacher, teacher, t_norm)
  train_step = make_train_step(model, teacher, kind=kind, mode=mode,
                               t_norm=t_norm, s_norm=s_norm)

  step_fn = mesh_lib.jit_sharded(
      train_step, in_shardings=(state_sh, t_sh, batch_sh),
      out_shardings=(state_sh, rep), donate_argnums=0)
  crop = tuple(config.crop_scale)
  local_batch = mesh_lib.per_process_batch(config.batch_size)
  num_views = int(config.teacher_cache.num_views)
  keys = ("rgb", "other") + (("teacher",) if num_views else ())
  prepare = lambda b: mesh_lib.shard_batch({k: b[k] for k in keys}, mesh)
  if num_views and jax.process_count() > 1:
    raise ValueError(
        "config.teacher_cache.num_views > 0 is single-process only (every "
        "process would store the whole cache); set it to 0 for multi-host "
        "runs.")
  if num_views:
    encode = jax.jit(encode_teacher, in_shardings=(t_sh, batch_sh))
    views = teacher_cache.build(
        functools.partial(encode, t_params), train_src, workdir=workdir,
        num_views=num_views, seed=config.seed, batch_size=local_batch,
        image_size=config.image_size, indices=indices, crop_scale=crop,
        mesh=mesh)
    batches = teacher_cache.CachedBatches(views, lambda v: teacher_cache.
                                          view_loader(
        train_src, view=v, seed=config.seed, batch_size=local_batch,
        image_size=config.image_size, indices=indices, crop_scale=crop))
  else:
    batches = iter(data_lib.paired_loader(
        train_src, batch_size=local_batch, image_size=config.image_size,
        train=True, seed=config.seed, indices=indices, crop_scale=crop))

  best = dict(artefacts_best(workdir))
  eval_fn = make_eval_fn(config, model, val_src, text, workdir, meta, best)
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.get("max_to_keep", checkpoint_lib.DEFAULT_MAX_TO_KEEP)) as ckpt, \
      metrics_lib.MetricWriter(workdir, total_steps=config.num_steps) as w:
    state, summary = loop.fit(
        state, lambda s, b: step_fn(s, t_params, b), batches,
        num_steps=config.num_steps, checkpointer=ckpt, writer=w,
        log_every=config.get("log_every", 50),
        ckpt_every=config.get("ckpt_every", None), eval_fn=eval_fn,
        eval_every=config.eval_every, prepare_batch=prepare)
  metrics_lib.plot_curves(os.path.join(workdir, metrics_lib.METRICS_FILE),
                          os.path.join(workdir, "loss.png"),
                          title="Dual-modality KD")
  other = info.other_modality
  return {"student_path": ".",
          "kd": {"best_val_top1_rgb": best.get("rgb"),
                 f"best_val_top1_{other}": best.get("other"),
                 "best_step": best.get("step"),
                 "loss": summary.get("loss"),
                 "kept_examples": None if indices is None else len(indices)}}


def artefacts_best(workdir: str) -> dict[str, Any]:
  """The best-so-far record of an interrupted run (empty when fresh)."""
  import json  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, artefacts.STUDENT_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return dict(json.load(f).get("best") or {})
