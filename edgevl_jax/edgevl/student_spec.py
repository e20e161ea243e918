"""The student of an EdgeVL run: its spec, ImageNet start and hand-off meta.

`config.student` = {name, overrides, normalization, hf_path}. With hf_path (a
local Hugging Face ViT / Swin / ResNet / MobileNetV2 folder; '' = from
scratch) the backbone starts from those weights (`students.load_hf`; the head
to D stays freshly initialised). The folder's config.json must agree with
student.name and its overrides; student.json records the loaded architecture
in full (`student_meta`), so later stages rebuild exactly that model.
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.models import students
from edgevl_jax.run import config as config_lib

NORMALIZATIONS = ("clip", "imagenet")
f = config_lib.field
# config.student of the EdgeVL stage-1 job.
SCHEMA: config_lib.Schema = {
    "name": f("vit_ti16", f"backbone, one of {students.NAMES}"),
    "overrides": f({}, "backbone fields, e.g. image_size, depth, width"),
    "normalization": f("clip", "input normalisation: 'clip' or 'imagenet'"),
    "hf_path": f("", "local Hugging Face ImageNet folder to start from ("
                 "'' = from scratch)"),
}
del f

# model_type -> the backbone class its weights fit, and the config.json
# field behind a student field where the names differ.
HF_BACKBONES = students.HF_FAMILIES
_HF_FIELDS = students.HF_FIELDS
# Numerics that come with the weights (e.g. HF ViT's LayerNorm eps 1e-12):
# adopted unless config.student.overrides sets them, then they must agree.
_ADOPTED = ("layer_norm_eps", "bn_epsilon", "qkv_bias")
# A training setting, not architecture: the config's value is kept.
_NOT_FROM_HF = ("drop_path_rate",)


def hf_path(config: Any) -> str:
  """config.student.hf_path, '' when absent (training from scratch)."""
  return config.student.hf_path


def _config_overrides(config: Any) -> dict[str, Any]:
  overrides = dict(config.student.overrides)
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
  explicit = dict(config.student.overrides)
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
  config_lib.require(config, "student.name", allowed=students.NAMES)
  config_lib.require(config, "student.normalization",
                       allowed=NORMALIZATIONS)
  overrides = dict(config.student.overrides)
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
  if hf_path(config) and not config_lib.is_reference(hf_path(config)):
    hf_overrides(config)


def student_meta(config: Any, embed_dim: int) -> dict[str, Any]:
  """The student.json dict for `handoff.save_student`.

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


def train_apply(model: Any, params: Any, model_state: Any, images: jax.Array,
                *, key: jax.Array) -> tuple[jax.Array, Any]:
  """Train-mode student forward: ((N, D) embeddings, new model_state).

  BatchNorm students (ResNet, MobileNetV2, GhostNet) normalise with the
  batch's statistics and update their running ones ('batch_stats' in
  model_state, carried by the TrainState and saved with the student);
  students without (model_state {}) return it unchanged.
  """
  variables = {"params": params, **model_state}
  if not model_state:
    return model.apply(variables, images, train=True,
                       rngs={"dropout": key}), model_state
  out, mutated = model.apply(variables, images, train=True,
                             rngs={"dropout": key},
                             mutable=list(model_state))
  return out, {**model_state, **mutated}
