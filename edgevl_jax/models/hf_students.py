"""ImageNet weights for the students from local Hugging Face folders.

Reads config.json plus model.safetensors (or its sharded index) or
pytorch_model.bin of `ViTModel` / `ViTForImageClassification`, `SwinModel` /
`SwinForImageClassification`, `ResNetModel` / `ResNetForImageClassification`
or `MobileNetV2Model` / `MobileNetV2ForImageClassification`, builds the
matching student from the config and converts every tensor:
  Linear weight (out, in) -> Dense kernel (in, out);
  Conv2d weight (O, I, kh, kw) -> Conv kernel (kh, kw, I, O) (depthwise:
    I == 1, which is Flax's layout for feature_group_count == channels);
  separate query/key/value Linears -> one fused qkv Dense (q | k | v);
  LayerNorm/BatchNorm weight -> scale; BatchNorm running_mean/var ->
    batch_stats mean/var;
  position embeddings, CLS token, Swin relative position bias tables as is.
Ignored: the classifier, ViT's pooler, BatchNorm num_batches_tracked. Swin's
relative position index is recomputed from the window (not stored).
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edgevl_jax.models import heads
from edgevl_jax.models import students
from edgevl_jax.utils import finite
from edgevl_jax.utils import jsonio

# model_type -> (student name, prefix of *ForImageClassification keys).
_FAMILIES = {"vit": ("vit_b16", "vit."), "swin": ("swin_t", "swin."),
             "resnet": ("resnet18", "resnet."),
             "mobilenet_v2": ("mobilenet_v2", "mobilenet_v2.")}
_IGNORED = re.compile(
    r"^(classifier\..*|pooler\..*|.*\.num_batches_tracked)$")
# transformers >= 5 in-memory names (written by torch.save(state_dict())) ->
# the names stored on the hub (written by save_pretrained), as regexes.
_RENAMES = {
    "vit": ((r"^layers\.(\d+)\.", r"encoder.layer.\1."),
            (r"\.attention\.([qkv])_proj\.", r".attention.attention.\1_proj."),
            (r"\.attention\.o_proj\.", r".attention.output.dense."),
            (r"\.mlp\.fc1\.", r".intermediate.dense."),
            (r"\.mlp\.fc2\.", r".output.dense.")),
    "swin": ((r"\.attention\.relative_position_bias\.", r".attention.self."),
             (r"\.attention\.([qkv])_proj\.", r".attention.self.\1_proj."),
             (r"\.attention\.o_proj\.", r".attention.output.dense."),
             (r"\.mlp\.fc1\.", r".intermediate.dense."),
             (r"\.mlp\.fc2\.", r".output.dense.")),
}
_QKV = ((".q_proj.", ".query."), (".k_proj.", ".key."), (".v_proj.", ".value."))

# Flax module path (joined by '/') -> HF module prefix; '{qkv}' expands to
# query, key, value. Leaf parameters without a module are mapped whole.
_VIT = (
    (r"cls_token", "embeddings.cls_token"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"patch_embed", "embeddings.patch_embeddings.projection"),
    (r"block(\d+)/norm1", r"encoder.layer.\1.layernorm_before"),
    (r"block(\d+)/attn/qkv", r"encoder.layer.\1.attention.attention.{qkv}"),
    (r"block(\d+)/attn/proj", r"encoder.layer.\1.attention.output.dense"),
    (r"block(\d+)/norm2", r"encoder.layer.\1.layernorm_after"),
    (r"block(\d+)/mlp/fc1", r"encoder.layer.\1.intermediate.dense"),
    (r"block(\d+)/mlp/fc2", r"encoder.layer.\1.output.dense"),
    (r"norm", "layernorm"),
)
_SWIN = (
    (r"patch_embed", "embeddings.patch_embeddings.projection"),
    (r"patch_norm", "embeddings.norm"),
    (r"stage(\d+)_block(\d+)/relative_position_bias_table",
     r"encoder.layers.\1.blocks.\2.attention.self.relative_position_bias_table"),
    (r"stage(\d+)_block(\d+)/norm1", r"encoder.layers.\1.blocks.\2.layernorm_before"),
    (r"stage(\d+)_block(\d+)/attn/qkv",
     r"encoder.layers.\1.blocks.\2.attention.self.{qkv}"),
    (r"stage(\d+)_block(\d+)/attn/proj",
     r"encoder.layers.\1.blocks.\2.attention.output.dense"),
    (r"stage(\d+)_block(\d+)/norm2", r"encoder.layers.\1.blocks.\2.layernorm_after"),
    (r"stage(\d+)_block(\d+)/mlp/fc1",
     r"encoder.layers.\1.blocks.\2.intermediate.dense"),
    (r"stage(\d+)_block(\d+)/mlp/fc2", r"encoder.layers.\1.blocks.\2.output.dense"),
    (r"stage(\d+)_merge/(norm|reduction)", r"encoder.layers.\1.downsample.\2"),
    (r"norm", "layernorm"),
)
_RESNET = (
    (r"stem_conv", "embedder.embedder.convolution"),
    (r"stem_bn/bn", "embedder.embedder.normalization"),
    (r"stage(\d+)_block(\d+)/layer(\d)_conv",
     r"encoder.stages.\1.layers.\2.layer.\3.convolution"),
    (r"stage(\d+)_block(\d+)/layer(\d)_bn/bn",
     r"encoder.stages.\1.layers.\2.layer.\3.normalization"),
    (r"stage(\d+)_block(\d+)/shortcut_conv",
     r"encoder.stages.\1.layers.\2.shortcut.convolution"),
    (r"stage(\d+)_block(\d+)/shortcut_bn/bn",
     r"encoder.stages.\1.layers.\2.shortcut.normalization"),
)
_MOBILENET = tuple(
    (f"{module}/{child}", f"{hf}.{hf_child}")
    for module, hf in (
        (r"stem_conv", "conv_stem.first_conv"),
        (r"stem_block/depthwise", "conv_stem.conv_3x3"),
        (r"stem_block/reduce", "conv_stem.reduce_1x1"),
        (r"block(\d+)/expand", r"layer.\1.expand_1x1"),
        (r"block(\d+)/depthwise", r"layer.\1.conv_3x3"),
        (r"block(\d+)/reduce", r"layer.\1.reduce_1x1"),
        (r"head_conv", "conv_1x1"))
    for child, hf_child in (("conv", "convolution"), ("bn/bn", "normalization")))
_RULES = {"vit": _VIT, "swin": _SWIN, "resnet": _RESNET,
          "mobilenet_v2": _MOBILENET}
_LEAF_SUFFIX = {"kernel": "weight", "scale": "weight", "bias": "bias",
                "mean": "running_mean", "var": "running_var"}


def _require(cfg: dict[str, Any], key: str, allowed: tuple[Any, ...],
             path: str) -> None:
  value = cfg.get(key, allowed[0])
  if value not in allowed:
    raise ValueError(
        f"{path}/config.json: {key}={value!r} is not supported by the "
        f"student (supported: {allowed}).")


def _side(cfg: dict[str, Any], key: str, path: str) -> int:
  value = cfg[key]
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"{path}/config.json: {key}={value} is not square; "
                       "the students take square sizes.")
    value = value[0]
  return int(value)


def read_config(path: str) -> dict[str, Any]:
  """config.json with transformers' defaults filled in for absent keys."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise ValueError(f"{cfg_file} not found; pass a Hugging Face model folder.")
  cfg = jsonio.read_json(
      cfg_file, fix="re-save the model with save_pretrained (a Hugging Face "
      "ViT / Swin / ResNet / MobileNetV2 folder)")
  try:
    from transformers import CONFIG_MAPPING  # pylint: disable=g-import-not-at-top
  except ImportError:  # Hub configs written by save_pretrained are complete.
    return cfg
  if cfg.get("model_type") in _FAMILIES:
    defaults = CONFIG_MAPPING[cfg["model_type"]]().to_dict()
    cfg = {**defaults, **cfg}
  return cfg


def student_overrides(cfg: dict[str, Any], path: str = "") -> dict[str, Any]:
  """Student architecture fields from a Hugging Face config dict."""
  try:
    return _student_overrides(cfg, path)
  except KeyError as e:
    raise ValueError(f"{path}/config.json has no {e}; it is needed to build "
                     "the student.") from e


def _student_overrides(cfg: dict[str, Any], path: str) -> dict[str, Any]:
  family = cfg.get("model_type")
  _require(cfg, "num_channels", (3,), path)
  if family == "vit":
    _require(cfg, "hidden_act", ("gelu",), path)
    return dict(image_size=_side(cfg, "image_size", path),
                patch_size=_side(cfg, "patch_size", path),
                width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"],
                mlp_dim=cfg["intermediate_size"],
                layer_norm_eps=cfg["layer_norm_eps"],
                qkv_bias=cfg.get("qkv_bias", True))
  if family == "swin":
    _require(cfg, "hidden_act", ("gelu",), path)
    _require(cfg, "use_absolute_embeddings", (False,), path)
    return dict(image_size=_side(cfg, "image_size", path),
                patch_size=_side(cfg, "patch_size", path),
                width=cfg["embed_dim"], depths=tuple(cfg["depths"]),
                num_heads=tuple(cfg["num_heads"]),
                window_size=cfg["window_size"], mlp_ratio=cfg["mlp_ratio"],
                qkv_bias=cfg.get("qkv_bias", True),
                layer_norm_eps=cfg["layer_norm_eps"],
                drop_path_rate=cfg.get("drop_path_rate", 0.1))
  if family == "resnet":
    _require(cfg, "layer_type", ("basic",), path)
    _require(cfg, "hidden_act", ("relu",), path)
    return dict(stage_sizes=tuple(cfg["depths"]),
                widths=tuple(cfg["hidden_sizes"]),
                stem_width=cfg["embedding_size"],
                downsample_in_first_stage=cfg.get(
                    "downsample_in_first_stage", False))
  if family == "mobilenet_v2":
    _require(cfg, "hidden_act", ("relu6",), path)
    _require(cfg, "output_stride", (32,), path)
    _require(cfg, "first_layer_is_expansion", (True,), path)
    return dict(image_size=_side(cfg, "image_size", path),
                width=cfg["depth_multiplier"],
                divisor=cfg["depth_divisible_by"], min_depth=cfg["min_depth"],
                expand_ratio=cfg["expand_ratio"],
                finegrained_output=cfg["finegrained_output"],
                tf_padding=cfg["tf_padding"], bn_epsilon=cfg["layer_norm_eps"])
  raise ValueError(
      f"{path}/config.json: model_type={family!r} is not a supported student "
      f"(supported: {sorted(_FAMILIES)}).")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """float32 numpy tensors from model.safetensors[.index.json] or .bin."""
  st = os.path.join(path, "model.safetensors")
  index = st + ".index.json"
  binary = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(st) or os.path.exists(index):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    if os.path.exists(st):
      files = [st]
    else:
      weight_map = jsonio.read_json(
          index, required=("weight_map",),
          fix="re-save the sharded checkpoint with save_pretrained")[
              "weight_map"]
      files = sorted(set(os.path.join(path, f) for f in weight_map.values()))
      missing = [f for f in files if not os.path.isfile(f)]
      if missing:
        raise ValueError(f"{index} lists shard(s) {missing} that are "
                         "missing; copy every shard of the checkpoint.")
    out = {}
    for f in files:
      try:
        out.update(load_file(f))
      except Exception as e:  # safetensors raises Rust-side error types.
        raise ValueError(
            f"could not read {f}: it is truncated or corrupt "
            f"({type(e).__name__}: {e}); re-copy the checkpoint.") from e
    return {k: np.asarray(v, np.float32) for k, v in out.items()}
  if os.path.exists(binary):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError(
          f"{binary} needs PyTorch to read; install torch or convert the "
          "folder to model.safetensors.") from e
    try:
      sd = torch.load(binary, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad pickle.
      raise ValueError(f"could not read {binary} ({type(e).__name__}: {e}); "
                       "re-copy the checkpoint.") from e
    return {k: v.float().numpy() for k, v in sd.items()}
  raise ValueError(
      f"{path} has no model.safetensors, model.safetensors.index.json or "
      "pytorch_model.bin; pass a Hugging Face model folder.")


def _normalise_keys(sd: dict[str, np.ndarray], family: str
                    ) -> dict[str, np.ndarray]:
  prefix = _FAMILIES[family][1]
  out = {}
  for k, v in sd.items():
    k = k[len(prefix):] if k.startswith(prefix) else k
    for pattern, hub in _RENAMES.get(family, ()):
      k = re.sub(pattern, hub, k)
    for new, hub in _QKV:
      k = k.replace(new, hub)
    if not _IGNORED.match(k):
      out[k] = v
  return out


def _hf_keys(family: str, flax_path: tuple[str, ...]) -> list[str]:
  """HF tensor names that make up one backbone leaf."""
  *module, leaf = flax_path
  joined = "/".join(flax_path)
  for pattern, target in _RULES[family]:
    if re.fullmatch(pattern, joined):  # a leaf mapped whole
      return [re.sub(pattern, target, joined)]
    if module and re.fullmatch(pattern, "/".join(module)):
      base = re.sub(pattern, target, "/".join(module))
      name = f"{base}.{_LEAF_SUFFIX[leaf]}"
      if "{qkv}" in name:
        return [name.format(qkv=p) for p in ("query", "key", "value")]
      return [name]
  raise ValueError(f"no Hugging Face tensor maps to student parameter "
                   f"{joined!r} ({family}).")


def _torch_shape(shape: tuple[int, ...], leaf: str, parts: int
                 ) -> tuple[int, ...]:
  """The PyTorch shape of one of `parts` tensors forming a Flax leaf."""
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1] // parts, shape[0])
  return (shape[0] // parts,) + tuple(shape[1:])


def _to_flax(tensors: list[np.ndarray], leaf: str) -> np.ndarray:
  if leaf == "kernel" and tensors[0].ndim == 4:
    return tensors[0].transpose(2, 3, 1, 0)
  if leaf == "kernel" and tensors[0].ndim == 2:
    return np.concatenate([t.T for t in tensors], axis=1)
  return np.concatenate(tensors, axis=0) if len(tensors) > 1 else tensors[0]


def _some(names: list[str], n: int = 8) -> str:
  """The first n names and how many more, for readable errors."""
  more = f" and {len(names) - n} more" if len(names) > n else ""
  return f"{names[:n]}{more} ({len(names)} in all)"


def convert(sd: dict[str, np.ndarray], family: str,
            shapes: dict[tuple[str, ...], tuple[int, ...]], path: str = ""
            ) -> dict[tuple[str, ...], np.ndarray]:
  """Maps an HF state dict onto backbone leaves {(collection, *path): shape}.

  Raises:
    ValueError: naming every missing or unexpected tensor, or the first
      tensor whose shape differs from what config.json implies.
  """
  sd = _normalise_keys(sd, family)
  plan = {k: _hf_keys(family, k[1:]) for k in shapes}
  wanted = {name for names in plan.values() for name in names}
  missing = sorted(wanted - set(sd))
  unexpected = sorted(set(sd) - wanted)
  if missing or unexpected:
    raise ValueError(
        f"{path}: checkpoint does not match the {family} student built from "
        f"its config.json: missing tensors {_some(missing)}; unexpected "
        f"tensors {_some(unexpected)}.")
  out = {}
  for key, names in plan.items():
    leaf = key[-1]
    expected = _torch_shape(shapes[key], leaf, len(names))
    for name in names:
      if tuple(sd[name].shape) != expected:
        raise ValueError(
            f"{path}: tensor {name!r} has shape {tuple(sd[name].shape)}, "
            f"expected {expected} (student parameter {'/'.join(key)}); "
            "config.json and the weights disagree.")
    out[key] = _to_flax([sd[n] for n in names], leaf)
  return out


def load(path: str, *, embed_dim: int | None = None,
         rng: jax.Array | None = None, quant: Any = None,
         **overrides: Any) -> tuple[students.Student, dict[str, Any]]:
  """Student and variables from a Hugging Face folder.

  Args:
    path: folder with config.json and the weights.
    embed_dim: projection size D; the head is freshly initialised from `rng`
      (default key 0). None: the pooled backbone output is the embedding.
    quant: passed to `students.build`.
    **overrides: further student fields (e.g. drop_path_rate, dtype).

  Returns:
    (model, variables) with variables {'params': {...}} plus 'batch_stats'
    for CNNs, parameters boxed with their logical axis names as by `init`.
  """
  cfg = read_config(path)
  family = cfg.get("model_type")
  kwargs = {**student_overrides(cfg, path), **overrides}
  model = students.build(_FAMILIES[family][0], embed_dim=embed_dim,
                         quant=quant, **kwargs)
  x = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  rng = jax.random.key(0) if rng is None else rng
  abstract = jax.eval_shape(model.init, rng, x)
  flat = traverse_util.flatten_dict(
      {c: v for c, v in abstract.items() if c in ("params", "batch_stats")})
  backbone = {(k[0],) + k[2:]: nn.meta.unbox(v).shape
              for k, v in flat.items() if k[1] == "backbone"}
  state = read_state_dict(path)
  finite.require_finite(
      state, where=f"student checkpoint {path!r}",
      fix="the checkpoint is corrupt or was saved after training diverged; "
      "re-copy it or use another checkpoint")
  values = convert(state, family, backbone, path)

  def fill(key, box):
    value = jnp.asarray(values[(key[0],) + key[2:]])
    if isinstance(box, nn.meta.AxisMetadata):
      return box.replace_boxed(value)
    return value

  variables = traverse_util.unflatten_dict(
      {k: fill(k, v) for k, v in flat.items() if k[1] == "backbone"})
  if embed_dim is not None:
    pooled = jax.eval_shape(
        functools.partial(model.apply, method="features"), abstract, x)
    head = heads.ProjectionHead(
        embed_dim, model.head_layer_norm, ops=model.ops, dtype=model.dtype)
    variables["params"]["head"] = head.init(
        rng, jnp.zeros((1, pooled["pooled"].shape[-1])))["params"]
  return model, variables
