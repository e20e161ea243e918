"""Edge student encoders: one builder for every backbone + projection head.

    model = students.build('swin_t', embed_dim=512)
    variables = model.init(rng, jnp.zeros((1, 224, 224, 3)))
    emb = model.apply(variables, images)                    # (B, 512)
    feats = model.apply(variables, images, method='features')
    feats['stages']  # four stage outputs (CKA convention of each backbone)
    feats['pooled']  # (B, C) backbone output before the head

With `train=True`, BatchNorm (CNNs) uses batch statistics and needs
`mutable=['batch_stats']`; drop-path (ViT, Swin) needs a 'dropout' rng.
`init` of a CNN also returns the 'bn_stats' collection (input moments sown by
`layers.BatchNorm`, see there); keep only 'params' and 'batch_stats'.
Parameters that take no weight decay in EdgeVL are the leaves named 'bias',
'scale', 'cls_token', 'pos_embed' and 'relative_position_bias_table'.
ImageNet initialisation: `load_hf(path, embed_dim=D)` reads a Hugging Face
ViT / Swin / ResNet / MobileNetV2 folder, or a timm GhostNetV3 folder
(config.json with `architecture`, no `model_type`; mapped by
`ghostnet.convert_timm`). For HF folders `HF_FAMILIES` maps config.json's
model_type to the family file whose `from_hf_config` gives the student's
fields and whose `HF_MAPPING` converts the tensors (hf_mapping.py); the
folder itself is read by hf_io.py. The classifier of *ForImageClassification
checkpoints is dropped and the head stays freshly initialised.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from edgevl_jax.models import dat
from edgevl_jax.models import ghostnet
from edgevl_jax.models import hf_io
from edgevl_jax.models import layers
from edgevl_jax.models import mobilenet
from edgevl_jax.models import resnet
from edgevl_jax.models import swin
from edgevl_jax.models import vit
from edgevl_jax.models.heads import ProjectionHead

# name -> (backbone class, its settings, whether the head has a LayerNorm).
_CONFIGS: dict[str, tuple[type[nn.Module], dict[str, Any], bool]] = {
    "vit_ti16": (vit.ViT, dict(width=192, depth=12, num_heads=3), False),
    "vit_s16": (vit.ViT, dict(width=384, depth=12, num_heads=6), False),
    "vit_b16": (vit.ViT, dict(width=768, depth=12, num_heads=12), False),
    # Official Swin-T drop-path 0.2; EdgeVL's public "Swin-T" config has the
    # Swin-S depths and drop-path 0.3; official Swin-S drop-path is 0.3.
    "swin_t": (swin.Swin, dict(depths=(2, 2, 6, 2), drop_path_rate=0.2), True),
    "swin_t_edgevl": (swin.Swin, dict(depths=(2, 2, 18, 2),
                                      drop_path_rate=0.3), True),
    "swin_s": (swin.Swin, dict(depths=(2, 2, 18, 2), drop_path_rate=0.3),
               True),
    # DAT++-T (dat_tiny.yaml); DAT's defaults are these, spelled out here.
    "dat_t": (dat.DAT, dict(dims=(64, 128, 256, 512), depths=(2, 4, 18, 2),
                            num_heads=(2, 4, 8, 16), drop_path_rate=0.2), True),
    "resnet18": (resnet.ResNet, dict(stage_sizes=(2, 2, 2, 2)), False),
    "resnet34": (resnet.ResNet, dict(stage_sizes=(3, 4, 6, 3)), False),
    "mobilenet_v2": (mobilenet.MobileNetV2, dict(width=1.0), False),
    # timm ghostnetv3_100; head Linear + LayerNorm as the Swin student.
    # `deploy=True` is the re-parameterised model (ghostnet.reparameterize).
    "ghostnetv3_100": (ghostnet.GhostNetV3, dict(width=1.0), True),
}
NAMES: tuple[str, ...] = tuple(_CONFIGS)

# Fields that are not architecture overrides.
_NOT_OVERRIDABLE = ("ops", "parent", "name")

# Hugging Face config.json model_type -> (family file, the student its
# weights build; config.json then overrides every architecture field).
_HF = {"vit": (vit, "vit_b16"), "swin": (swin, "swin_t"),
       "resnet": (resnet, "resnet18"),
       "mobilenet_v2": (mobilenet, "mobilenet_v2")}
# model_type -> the backbone class its weights fit.
HF_FAMILIES: dict[str, type[nn.Module]] = {
    t: _CONFIGS[name][0] for t, (_, name) in _HF.items()}
# model_type -> {student field: config.json key}, where the names differ.
HF_FIELDS: dict[str, dict[str, str]] = {
    t: family.HF_FIELDS for t, (family, _) in _HF.items()}
_HF_FIX = ("re-save the model with save_pretrained (a Hugging Face ViT / "
           "Swin / ResNet / MobileNetV2 folder: config.json plus weights) "
           "or timm's save_for_hf (a GhostNetV3 folder)")
# The student a timm GhostNetV3 folder builds (its width from config.json).
TIMM_STUDENT = "ghostnetv3_100"


class Student(nn.Module):
  """A backbone and a projection head to the teacher embedding size.

  Attributes:
    backbone: module returning {'stages': tuple, 'pooled': (B, C)}.
    embed_dim: D, the teacher embedding size; None makes `pooled` the
      embedding (no head).
    head_layer_norm: LayerNorm(D) after the projection (Swin).
  """

  backbone: nn.Module
  embed_dim: int | None
  head_layer_norm: bool = False
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  def setup(self):
    self.head = (None if self.embed_dim is None else ProjectionHead(
        self.embed_dim, self.head_layer_norm, ops=self.ops, dtype=self.dtype))

  @property
  def image_size(self) -> int:
    """Nominal input side, e.g. for `jnp.zeros((1, s, s, 3))` at init."""
    return self.backbone.image_size

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images: (B, H, W, 3) normalised -> (B, D) unnormalised embedding."""
    pooled = self.backbone(images, train=train)["pooled"]
    return pooled if self.head is None else self.head(pooled)

  def features(self, images: jax.Array, train: bool = False
               ) -> dict[str, Any]:
    """images: (B, H, W, 3) -> {'stages': 4 stage outputs, 'pooled': (B, C)}."""
    return self.backbone(images, train=train)


def allowed_overrides(name: str) -> tuple[str, ...]:
  """Architecture fields `build(name, **overrides)` accepts."""
  if name not in _CONFIGS:
    raise ValueError(f"unknown student {name!r}; choose one of {NAMES}.")
  cls = _CONFIGS[name][0]
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.name not in _NOT_OVERRIDABLE)


def build(name: str, *, embed_dim: int | None, quant: Any = None,
          **overrides: Any) -> Student:
  """Builds student `name` projecting to `embed_dim`.

  Args:
    name: one of `NAMES`.
    embed_dim: teacher embedding size D (None: no head, pooled output).
    quant: None for float ops, or an object with `.ops() -> layers.Ops`
      (e.g. the int8 `QuantSpec`), injected into every matmul and conv.
    **overrides: backbone fields, e.g. `image_size=32, patch_size=4,
      depth=2` to shrink a model for tests; `dtype` sets the compute dtype.

  Returns:
    An unbound `Student`.
  """
  allowed = allowed_overrides(name)
  unknown = sorted(set(overrides) - set(allowed))
  if unknown:
    raise ValueError(
        f"unknown override(s) {unknown} for student {name!r}; allowed: "
        f"{sorted(allowed)}.")
  if embed_dim is not None and embed_dim < 1:
    raise ValueError(f"embed_dim must be a positive int or None, got "
                     f"{embed_dim}.")
  ops = layers.Ops() if quant is None else quant.ops()
  cls, settings, head_layer_norm = _CONFIGS[name]
  kwargs = {**settings, **overrides}
  backbone = cls(ops=ops, **kwargs)
  return Student(backbone, embed_dim, head_layer_norm, ops=ops,
                 dtype=kwargs.get("dtype", jnp.float32))


def read_hf_config(path: str) -> dict[str, Any]:
  """config.json of an HF student folder, transformers' defaults filled in.

  Raises:
    ValueError: no folder or config.json (also a FileNotFoundError), bad
      JSON, or a model_type that is not in `HF_FAMILIES`.
  """
  cfg = hf_io.read_config(path, what="student checkpoint",
                          model_types=tuple(_HF), fix=_HF_FIX)
  try:
    # transformers is slow to import and only fills keys a hand-written
    # config.json omits; configs written by save_pretrained are complete.
    from transformers import CONFIG_MAPPING  # pylint: disable=g-import-not-at-top
  except ImportError:
    return cfg
  return {**CONFIG_MAPPING[cfg["model_type"]]().to_dict(), **cfg}


def hf_overrides(cfg: dict[str, Any], path: str = "") -> dict[str, Any]:
  """Student architecture fields from an HF config dict (`read_hf_config`).

  Raises:
    ValueError: an unsupported model_type or setting, or an absent key.
  """
  model_type = cfg.get("model_type")
  if model_type not in _HF:
    raise ValueError(
        f"{path}/config.json: model_type={model_type!r} is not a supported "
        f"student (supported: {sorted(_HF)}).")
  try:
    return _HF[model_type][0].from_hf_config(cfg, path)
  except KeyError as e:
    raise ValueError(f"{path}/config.json has no {e}; it is needed to build "
                     "the student.") from e


def _timm_architecture(path: str) -> str | None:
  """`architecture` of a timm folder's config.json (no `model_type`), or
  None for anything else (read_hf_config then names what is wrong)."""
  cfg_file = os.path.join(os.fspath(path), hf_io.CONFIG)
  try:
    with open(cfg_file, encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(cfg, dict) or "model_type" in cfg:
    return None
  arch = cfg.get("architecture")
  return arch if isinstance(arch, str) else None


def load_hf(path: str, *, embed_dim: int | None = None,
            rng: jax.Array | None = None, quant: Any = None,
            **overrides: Any) -> tuple[Student, dict[str, Any]]:
  """ImageNet student from a local Hugging Face folder: (model, variables).

  Args:
    path: folder with config.json and the weights (see hf_io.py): a
      Hugging Face model, or a timm GhostNetV3 (`architecture` in
      config.json).
    embed_dim: projection size D; the head is freshly initialised from `rng`
      (default key 0). None: the pooled backbone output is the embedding.
    quant: passed to `build`.
    **overrides: further student fields (e.g. drop_path_rate, dtype).

  Returns:
    (model, variables) with variables {'params': {...}} plus 'batch_stats'
    for CNNs, parameters boxed with their logical axis names as by `init`.

  Raises:
    ValueError: naming the folder and what is wrong with it (see hf_io.py),
      or every missing, unexpected or mis-shaped tensor.
  """
  arch = _timm_architecture(path)
  if arch is not None:
    cfg = hf_io.read_config(path, what="student checkpoint",
                            model_types=(None,), fix=_HF_FIX)
    model = build(TIMM_STUDENT, embed_dim=embed_dim, quant=quant,
                  **{**ghostnet.from_timm_config(cfg, path), **overrides})
    convert = ghostnet.convert_timm
  else:
    cfg = read_hf_config(path)
    family, name = _HF[cfg["model_type"]]
    model = build(name, embed_dim=embed_dim, quant=quant,
                  **{**hf_overrides(cfg, path), **overrides})
    convert = family.HF_MAPPING.convert
  x = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  rng = jax.random.key(0) if rng is None else rng
  abstract = jax.eval_shape(model.init, rng, x)
  flat = traverse_util.flatten_dict(
      {c: v for c, v in abstract.items() if c in ("params", "batch_stats")})
  flat = {k: v for k, v in flat.items() if k[1] == "backbone"}
  # (collection, *path inside the backbone) -> shape.
  shapes = {(k[0],) + k[2:]: nn.meta.unbox(v).shape for k, v in flat.items()}
  state = hf_io.read_state_dict(path, what="student checkpoint")
  values = convert(state, shapes, where=path)

  def fill(key, box):
    value = jnp.asarray(values[(key[0],) + key[2:]])
    if isinstance(box, nn.meta.AxisMetadata):
      return box.replace_boxed(value)
    return value

  variables = traverse_util.unflatten_dict(
      {k: fill(k, v) for k, v in flat.items()})
  if embed_dim is not None:
    pooled = jax.eval_shape(
        functools.partial(model.apply, method="features"), abstract, x)
    head = ProjectionHead(
        embed_dim, model.head_layer_norm, ops=model.ops, dtype=model.dtype)
    variables["params"]["head"] = head.init(
        rng, jnp.zeros((1, pooled["pooled"].shape[-1])))["params"]
  return model, variables


# Families trained with re-parameterisable branches: class -> fold function
# (variables of deploy=False -> variables of deploy=True).
_REPARAMETERIZE = {ghostnet.GhostNetV3: ghostnet.reparameterize}


def deploy_form(name: str, overrides: dict[str, Any], variables: Any
                ) -> tuple[dict[str, Any], Any]:
  """(overrides, variables) of the student as it is deployed.

  Re-parameterisable students (GhostNetV3) fold their train-time branches
  into single convs (`deploy=True`); quantisation-aware training,
  calibration and export then work on the folded convs, as GhostNetV3
  prescribes (fold, then quantise). Other students come back unchanged.
  """
  cls = _CONFIGS[name][0] if name in _CONFIGS else None
  fold = _REPARAMETERIZE.get(cls)
  if fold is None or overrides.get("deploy"):
    return dict(overrides), variables
  return {**overrides, "deploy": True}, fold(variables)
