"""GhostNetV3 backbone (Liu et al., "GhostNetV3: Exploring the Training
Strategies for Compact Models", arXiv 2404.11202), NHWC, as timm's
`ghostnetv3_*` (timm/models/ghostnet.py, version='v3').

Stem conv3x3/2 -> BN -> ReLU; 16 ghost bottlenecks in 9 groups (`CFGS`);
a 1x1 conv-BN-ReLU to 960 channels (width 1.0); global average pool; a 1x1
conv with bias to 1280 and ReLU (timm's pre-logits, our `pooled`).

Ghost module (train time): x1 = ReLU(sum of 3 1x1 conv-BN branches);
x2 = ReLU(1x1 depthwise conv-BN (scale branch) + BN (identity branch) +
sum of 3 3x3 depthwise conv-BN branches); out = [x1, x2]. From the third
bottleneck on, the first ghost module is gated by V2's DFC attention:
sigmoid(BN(dw 5x1(BN(dw 1x5(BN(1x1(avgpool2(x)))))))), nearest-upsampled.
Stride-2 bottlenecks replace the depthwise conv-BN by 3 kxk depthwise
conv-BN branches plus a 1x1 stride-2 one. `reparameterize` folds each of
these multi-branch sums into one conv with bias (`deploy=True` builds that
model); BatchNorms outside them (stem, DFC, shortcut, final conv) stay.

Every conv goes through `layers.Ops`, so the int8 spec quantises the folded
convs too. Module names mirror timm's (`blocks_3_0/ghost1/primary_rpr_conv_0`
is `blocks.3.0.ghost1.primary_rpr_conv.0`); `convert_timm` maps a timm
state dict.

Output of `GhostNetV3.__call__(images, train)`: a dict with
  stages: outputs of the last group at each stride from 4 on (CFGS: groups
    2, 4, 6, 8), (B, H/4, W/4, 24), (B, H/8, W/8, 40), (B, H/16, W/16, 112),
    (B, H/32, W/32, 160) at width 1.0;
  pooled: (B, 1280) timm's pre-logits features;
  logits: (B, num_classes), only when num_classes > 0 (timm's classifier).
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax.models import hf_io
from edgevl_jax.models import layers
from edgevl_jax.models.heads import check_images
from edgevl_jax.models.mobilenet import make_divisible

# (kernel, expanded, out, SE ratio, stride) per bottleneck, grouped as timm's
# `blocks.<group>.<index>` (width 1.0 channels).
CFGS = (
    ((3, 16, 16, 0.0, 1),),
    ((3, 48, 24, 0.0, 2),),
    ((3, 72, 24, 0.0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0.0, 2),),
    ((3, 200, 80, 0.0, 1), (3, 184, 80, 0.0, 1), (3, 184, 80, 0.0, 1),
     (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1)),
    ((5, 672, 160, 0.25, 2),),
    ((5, 960, 160, 0.0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0.0, 1),
     (5, 960, 160, 0.25, 1)),
)
BN_EPS = 1e-5  # torch BatchNorm2d


def _pad(kh: int, kw: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """torch's symmetric k // 2 padding."""
  return ((kh // 2, kh // 2), (kw // 2, kw // 2))


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm, no activation (timm ConvBnAct, act None).

  Attributes:
    features: output channels.
    kernel: (kh, kw).
    strides: stride.
    depthwise: one group per input channel.
  """

  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  depthwise: bool = False
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = layers.conv(
        self.features, self.kernel, ops=self.ops, strides=self.strides,
        padding=_pad(*self.kernel),
        feature_group_count=x.shape[-1] if self.depthwise else 1,
        use_bias=False, dtype=self.dtype, kernel_init=layers.conv_init,
        name="conv")(x)
    return layers.BatchNorm(epsilon=BN_EPS, dtype=self.dtype, name="bn1")(
        x, use_running_average=not train)


def _nearest(size_in: int, size_out: int) -> np.ndarray:
  """Source rows of torch's F.interpolate(mode='nearest')."""
  scale = np.float32(size_in / size_out)
  idx = np.floor(np.arange(size_out, dtype=np.float32) * scale)
  return np.minimum(idx.astype(np.int32), size_in - 1)


class GhostModule(nn.Module):
  """GhostModuleV3 (ratio 2, 1x1 primary, 3x3 cheap operation).

  Attributes:
    features: output channels (even: the two halves are concatenated).
    relu: ReLU after both halves (False in a bottleneck's second module).
    dfc: gate the output with the DFC attention (timm mode 'shortcut').
    deploy: one conv with bias per half instead of the branches.
    branches: conv-BN branches per half at train time (3).
  """

  features: int
  relu: bool = True
  dfc: bool = False
  deploy: bool = False
  branches: int = 3
  dw_size: int = 3
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, features)."""
    init = math.ceil(self.features / 2)
    act = nn.relu if self.relu else (lambda y: y)
    k = self.dw_size
    kw = dict(ops=self.ops, dtype=self.dtype)
    if self.deploy:
      x1 = act(layers.conv(init, (1, 1), padding=_pad(1, 1),
                           name="primary_conv", **kw)(x))
      x2 = act(layers.conv(init, (k, k), padding=_pad(k, k),
                           feature_group_count=init,
                           name="cheap_operation", **kw)(x1))
    else:
      x1 = ConvBN(init, name="primary_rpr_conv_0", **kw)(x, train=train)
      for i in range(1, self.branches):
        x1 = x1 + ConvBN(init, name=f"primary_rpr_conv_{i}", **kw)(
            x, train=train)
      x1 = act(x1)
      x2 = ConvBN(init, depthwise=True, name="cheap_rpr_scale", **kw)(
          x1, train=train)
      x2 = x2 + layers.BatchNorm(epsilon=BN_EPS, dtype=self.dtype,
                                 name="cheap_rpr_skip")(
                                     x1, use_running_average=not train)
      for i in range(self.branches):
        x2 = x2 + ConvBN(init, (k, k), depthwise=True,
                         name=f"cheap_rpr_conv_{i}", **kw)(x1, train=train)
      x2 = act(x2)
    out = jnp.concatenate([x1, x2], axis=-1)
    if not self.dfc:
      return out
    # DFC attention on the half-resolution input (floor, as avg_pool2d).
    c = self.features
    if min(x.shape[1:3]) < 2:
      raise ValueError(
          f"GhostNetV3's DFC attention pools a {x.shape[1]}x{x.shape[2]} map "
          "by 2; feed images of at least 64x64 (the stride-32 map must be "
          "at least 2x2).")
    res = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    for i, (kernel, groups) in enumerate(
        (((1, 1), 1), ((1, 5), c), ((5, 1), c))):
      res = layers.conv(c, kernel, padding=_pad(*kernel),
                        feature_group_count=groups, use_bias=False,
                        kernel_init=layers.conv_init,
                        name=f"short_conv_{2 * i}", **kw)(res)
      res = layers.BatchNorm(epsilon=BN_EPS, dtype=self.dtype,
                             name=f"short_conv_{2 * i + 1}")(
                                 res, use_running_average=not train)
    gate = jax.nn.sigmoid(res)
    gate = gate[:, _nearest(res.shape[1], out.shape[1])]
    gate = gate[:, :, _nearest(res.shape[2], out.shape[2])]
    return out[..., :c] * gate


class SqueezeExcite(nn.Module):
  """timm SqueezeExcite: mean -> 1x1 -> ReLU -> 1x1 -> hard sigmoid gate."""

  reduced: int
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    kw = dict(ops=self.ops, dtype=self.dtype, padding="VALID")
    s = nn.relu(layers.conv(self.reduced, (1, 1), name="conv_reduce", **kw)(s))
    s = layers.conv(x.shape[-1], (1, 1), name="conv_expand", **kw)(s)
    return x * (jnp.clip(s + 3.0, 0.0, 6.0) / 6.0)


class Bottleneck(nn.Module):
  """GhostBottleneckV3: ghost1 -> [stride-2 depthwise] -> [SE] -> ghost2,
  plus an identity or dw-conv-BN-1x1-conv-BN shortcut.

  Attributes:
    mid: channels of ghost1's output.
    features: output channels.
    kernel: depthwise kernel side (stride-2 conv and shortcut).
    strides: 1 or 2.
    se_ratio: SE reduction (0: no SE).
    dfc: DFC attention in ghost1.
    deploy: folded model.
  """

  mid: int
  features: int
  kernel: int = 3
  strides: int = 1
  se_ratio: float = 0.0
  dfc: bool = False
  deploy: bool = False
  branches: int = 3
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, C) -> (B, H / strides, W / strides, features)."""
    kw = dict(ops=self.ops, dtype=self.dtype)
    gkw = dict(deploy=self.deploy, branches=self.branches, **kw)
    k, s = self.kernel, self.strides
    y = GhostModule(self.mid, relu=True, dfc=self.dfc, name="ghost1", **gkw)(
        x, train=train)
    if s > 1:
      if self.deploy:
        y = layers.conv(self.mid, (k, k), strides=s, padding=_pad(k, k),
                        feature_group_count=self.mid, name="conv_dw", **kw)(y)
      else:
        y_sum = ConvBN(self.mid, strides=s, depthwise=True,
                       name="dw_rpr_scale", **kw)(y, train=train)
        for i in range(self.branches):
          y_sum = y_sum + ConvBN(self.mid, (k, k), s, depthwise=True,
                                 name=f"dw_rpr_conv_{i}", **kw)(y, train=train)
        y = y_sum
    if self.se_ratio > 0:
      y = SqueezeExcite(make_divisible(self.mid * self.se_ratio, 4),
                        name="se", **kw)(y)
    y = GhostModule(self.features, relu=False, name="ghost2", **gkw)(
        y, train=train)
    if x.shape[-1] == self.features and s == 1:
      return y + x
    c_in = x.shape[-1]
    sc = x
    for i, (c, kernel, stride, groups) in enumerate(
        ((c_in, k, s, c_in), (self.features, 1, 1, 1))):
      sc = layers.conv(c, (kernel, kernel), strides=stride,
                       padding=_pad(kernel, kernel), feature_group_count=groups,
                       use_bias=False, kernel_init=layers.conv_init,
                       name=f"shortcut_{2 * i}", **kw)(sc)
      sc = layers.BatchNorm(epsilon=BN_EPS, dtype=self.dtype,
                            name=f"shortcut_{2 * i + 1}")(
                                sc, use_running_average=not train)
    return y + sc


class GhostNetV3(nn.Module):
  """GhostNetV3 backbone; width 1.0 is timm's ghostnetv3_100.

  Attributes:
    image_size: nominal input side (used to build init inputs).
    width: channel multiplier (channels rounded to multiples of 4).
    head_features: channels of the pooled 1x1 conv (1280 at every width).
    num_classes: > 0 adds timm's classifier (`logits`); the EdgeVL student
      uses 0 and its own projection head.
    deploy: the folded model that `reparameterize` produces variables for.
      It can be trained too (e.g. int8 QAT of the folded convs, which is
      what gets served); its remaining BatchNorms then use batch stats.
    branches: conv-BN branches of each re-parameterisable conv (3).
    cfgs: bottleneck groups (`CFGS`); a shorter tuple makes a test model.
  """

  image_size: int = 224
  width: float = 1.0
  head_features: int = 1280
  num_classes: int = 0
  deploy: bool = False
  branches: int = 3
  cfgs: tuple[tuple[tuple[int, int, int, float, int], ...], ...] = CFGS
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    """images: (B, H, W, 3) -> {'stages', 'pooled'[, 'logits']}."""
    check_images(images, "GhostNetV3")
    kw = dict(ops=self.ops, dtype=self.dtype)
    x = layers.conv(make_divisible(16 * self.width, 4), (3, 3), strides=2,
                    padding=_pad(3, 3), use_bias=False,
                    kernel_init=layers.conv_init, name="conv_stem", **kw)(
                        images.astype(self.dtype))
    x = nn.relu(layers.BatchNorm(epsilon=BN_EPS, dtype=self.dtype,
                                 name="bn1")(x, use_running_average=not train))
    stages, layer, stride = [], 0, 2
    for g, group in enumerate(self.cfgs):
      for j, (k, expanded, c, se_ratio, s) in enumerate(group):
        # timm: the first two bottlenecks have no DFC attention.
        x = Bottleneck(make_divisible(expanded * self.width, 4),
                       make_divisible(c * self.width, 4), k, s, se_ratio,
                       dfc=layer > 1, deploy=self.deploy,
                       branches=self.branches, name=f"blocks_{g}_{j}", **kw)(
                           x, train=train)
        layer += 1
        stride *= s
      last_at_stride = g + 1 == len(self.cfgs) or self.cfgs[g + 1][0][4] > 1
      if last_at_stride and stride >= 4:
        stages.append(x)
    x = ConvBN(make_divisible(self.cfgs[-1][-1][1] * self.width, 4),
               name=f"blocks_{len(self.cfgs)}_0", **kw)(x, train=train)
    x = jnp.mean(nn.relu(x), axis=(1, 2), keepdims=True)
    x = layers.conv(self.head_features, (1, 1), padding="VALID",
                    name="conv_head", **kw)(x)
    out = {"stages": tuple(stages), "pooled": nn.relu(x)[:, 0, 0]}
    if self.num_classes:
      out["logits"] = layers.dense(
          self.num_classes, ops=self.ops, axes=(layers.EMBED, layers.CLASSES),
          dtype=self.dtype, name="classifier")(out["pooled"])
    return out


# Re-parameterisation: train-time branches -> one conv with bias each.


def _fuse(p: dict[str, Any], s: dict[str, Any], kernel: np.ndarray | None,
          size: int) -> tuple[np.ndarray, np.ndarray]:
  """(kxk kernel, bias) of conv-then-BN, evaluated with running stats.

  `kernel` None means the identity branch (a BN alone): a depthwise kernel
  with 1 at the centre. Smaller kernels are zero-padded to `size`.
  """
  bn, stats = p["bn"], s["bn"]
  t = np.asarray(bn["scale"]) / np.sqrt(np.asarray(stats["var"]) + BN_EPS)
  if kernel is None:
    kernel = np.zeros((size, size, 1, t.shape[0]), np.float32)
    kernel[size // 2, size // 2] = 1.0
  pad = (size - kernel.shape[0]) // 2
  kernel = np.pad(np.asarray(kernel), ((pad, pad), (pad, pad), (0, 0), (0, 0)))
  return kernel * t, np.asarray(bn["bias"]) - np.asarray(stats["mean"]) * t


def _fold_sum(p: dict[str, Any], s: dict[str, Any], names: list[str],
              size: int, identity: str | None = None) -> dict[str, np.ndarray]:
  """One conv {kernel, bias} equal to the sum of conv-BN branches `names`."""
  parts = [_fuse(p[n]["bn1"], s[n]["bn1"], p[n]["conv"]["kernel"], size)
           for n in names]
  if identity is not None:
    parts.append(_fuse(p[identity], s[identity], None, size))
  return {"kernel": sum(k for k, _ in parts), "bias": sum(b for _, b in parts)}


def _fold(p: dict[str, Any], s: dict[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Folds the branches under scope `p` (params) / `s` (batch_stats)."""
  p, s = dict(p), dict(s)
  new = {}
  if "primary_rpr_conv_0" in p:  # a ghost module
    primary = sorted(n for n in p if n.startswith("primary_rpr_conv_"))
    cheap = sorted(n for n in p if n.startswith("cheap_rpr_conv_"))
    size = np.shape(p[cheap[0]]["conv"]["kernel"])[0]
    new["primary_conv"] = _fold_sum(p, s, primary, 1)
    new["cheap_operation"] = _fold_sum(p, s, ["cheap_rpr_scale"] + cheap,
                                       size, identity="cheap_rpr_skip")
    for n in primary + cheap + ["cheap_rpr_scale", "cheap_rpr_skip"]:
      p.pop(n), s.pop(n)
  if "dw_rpr_conv_0" in p:  # a stride-2 bottleneck
    dw = sorted(n for n in p if n.startswith("dw_rpr_conv_"))
    size = np.shape(p[dw[0]]["conv"]["kernel"])[0]
    new["conv_dw"] = _fold_sum(p, s, ["dw_rpr_scale"] + dw, size)
    for n in dw + ["dw_rpr_scale"]:
      p.pop(n), s.pop(n)
  for name, child in p.items():
    if isinstance(child, dict):
      p[name], folded = _fold(child, s.get(name, {}))
      if name in s:
        s[name] = folded
  return {**p, **new}, s


def reparameterize(variables: dict[str, Any]) -> dict[str, Any]:
  """Variables of a `deploy=False` GhostNetV3 (or a student holding one) ->
  variables of the same model built with `deploy=True`.

  Each multi-branch conv-BN sum becomes one conv with bias using the running
  statistics, so the deploy model equals the eval-mode (train=False) model.
  Fold before calibrating a static int8 model: the ranges belong to the
  folded convs. Parameters come back unboxed (numpy); other collections
  than params and batch_stats are returned unchanged.
  """
  unboxed = nn.meta.unbox(variables)
  params, stats = _fold(jax.tree.map(np.asarray, unboxed["params"]),
                        jax.tree.map(np.asarray,
                                     unboxed.get("batch_stats", {})))
  out = {**variables, "params": params}
  if "batch_stats" in variables:
    out["batch_stats"] = stats
  return out


# timm `ghostnetv3_*` folders and state dicts (train-time, not
# re-parameterised). A folder saved by timm (`save_for_hf` /
# push_to_hub) holds config.json with `architecture` and model.safetensors
# or pytorch_model.bin.

# timm architecture -> width.
TIMM_WIDTHS = {"ghostnetv3_050": 0.5, "ghostnetv3_100": 1.0,
               "ghostnetv3_130": 1.3, "ghostnetv3_160": 1.6}


def from_timm_config(cfg: dict[str, Any], path: str = "") -> dict[str, Any]:
  """`GhostNetV3` fields from a timm config.json dict.

  Raises:
    ValueError: an architecture that is not a GhostNetV3, a non-square or
      non-RGB input size.
  """
  arch = cfg.get("architecture")
  if arch not in TIMM_WIDTHS:
    raise ValueError(
        f"{path}/config.json: architecture={arch!r} is not a supported timm "
        f"student (supported: {sorted(TIMM_WIDTHS)}).")
  size = (cfg.get("pretrained_cfg") or {}).get("input_size", (3, 224, 224))
  if len(size) != 3 or size[0] != 3 or size[1] != size[2]:
    raise ValueError(f"{path}/config.json: pretrained_cfg.input_size={size} "
                     "is not a square RGB size.")
  return dict(width=TIMM_WIDTHS[arch], image_size=int(size[1]))

_IGNORED = re.compile(r".*\.num_batches_tracked$")


def timm_name(key: tuple[str, ...]) -> str:
  """timm tensor name of a backbone leaf (collection, *module path, leaf).

  'blocks_3_0' -> 'blocks.3.0'; the inner 'bn' scope of `layers.BatchNorm`
  is dropped; leaves are renamed as hf_io.LEAF_NAMES (kernel -> weight, ...).
  """
  *modules, leaf = key[1:]
  parts = [re.sub(r"_(\d+)", r".\1", m) for m in modules if m != "bn"]
  return ".".join(parts + [hf_io.LEAF_NAMES.get(leaf, leaf)])


def convert_timm(state: dict[str, np.ndarray],
                 shapes: dict[tuple[str, ...], tuple[int, ...]], *,
                 where: str) -> dict[tuple[str, ...], np.ndarray]:
  """Maps a timm GhostNetV3 state dict onto backbone leaves.

  Args:
    state: timm name -> array (torch layouts); the classifier is dropped
      when the backbone has none (num_classes=0).
    shapes: {(collection, *path inside the backbone, leaf): Flax shape}.
    where: names the source in messages.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped tensor.
  """
  names = {key: timm_name(key) for key in shapes}
  wanted = {names[k]: hf_io.torch_shape(v, k[-1]) for k, v in shapes.items()}
  state = {k: np.asarray(v) for k, v in state.items()
           if not _IGNORED.match(k)
           and (k in wanted or not k.startswith("classifier."))}
  hf_io.match_tensors(state, wanted, where=where, model="ghostnetv3 student")
  return {key: hf_io.torch_to_flax(state[name], key[-1])
          for key, name in names.items()}
