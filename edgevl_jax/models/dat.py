"""DAT++ backbone (Xia et al., "DAT++: Spatially Dynamic Vision Transformer
with Deformable Attention", arXiv 2309.01430) for edge students.

The layout of the official code (LeapLabTHU/DAT: models/dat.py,
dat_blocks.py, configs/dat_tiny.yaml), NHWC. Stem: conv3x3 -> LN -> GELU ->
conv3x3 -> LN (overlapping, stride 4); conv3x3/s2 (no bias) -> LN between
stages; `stages` are the stage outputs, pooled = mean(LN(last map)). Block:
x += LPU(x); x += DropPath(attn(LN(x))); x += DropPath(ConvFFN(LN(x))), with
attn per `stage_spec` letter, DAT-T: N,D | N,D,N,D | (N,D) x 9 | D,D.

Deformable attention ('D'): q = Wq x; the offset network (depthwise kxk
conv of stride r on each group's q channels -> LN -> GELU -> 1x1 conv to 2,
no bias, shared by the groups) predicts (dy, dx) for each of the (H/r, W/r)
reference points; positions = clip(ref + offset, -1, 1) (DAT++'s
offset_range_factor -1); keys and values are projected from the map sampled
there (`sampling.grid_sample`, bilinear, align_corners=True, float32); the
deformable relative position bias samples a (heads, 2H-1, 2W-1) table at
half the query-to-key displacement in normalised coordinates.

Neighbourhood attention ('N'): NATTEN's semantics in plain JAX (no custom
kernel): each query attends to the kxk window centred on it, shifted inwards
at the borders (start = clip(i - k//2, 0, L - k)), bias rpb[h, dy + k - 1,
dx + k - 1]; maps smaller than k are zero-padded bottom/right after the LN
and cropped, as the reference. Keys and values are gathered into (B, HW,
k*k, heads, d) neighbourhoods (k^2 times the map's memory).

Every Dense and conv (offset network included) goes through `layers.Ops`;
q k^T and attn v through `layers.einsum`; sampling stays float32.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax.models import layers
from edgevl_jax.models.heads import check_images
from edgevl_jax.models.sampling import grid_sample

_PAD1 = ((1, 1), (1, 1))  # torch padding=1; 'SAME' differs at stride 2


def neighbourhood_index(length: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """NATTEN windows along one axis of `length` >= k.

  Returns:
    keys: (length, k) key position of each query's window slot;
    rel: (length, k) index into the 2k-1 bias axis, key - query + k - 1.
  """
  i = np.arange(length)
  start = np.clip(i - k // 2, 0, length - k)
  keys = start[:, None] + np.arange(k)[None]
  return keys, keys - i[:, None] + (k - 1)


def normalised_grid(h: int, w: int, shift: float) -> np.ndarray:
  """(h, w, 2) (y, x) points ((i + shift) / (n - 1)) * 2 - 1, as DAT++.

  shift 0: the query positions, in [-1, 1]. shift 0.5: the reference points;
  the reference divides pixel centres by n - 1, so the last row lands beyond
  +1 (the clip of offset_range_factor -1 puts it back).
  """
  ys = (np.arange(h) + shift) / (h - 1.0) * 2.0 - 1.0
  xs = (np.arange(w) + shift) / (w - 1.0) * 2.0 - 1.0
  return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).astype(np.float32)


def _split_groups(x: jax.Array, groups: int) -> jax.Array:
  """(B, H, W, g * c) -> (B * g, H, W, c), group-major channels as torch."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, groups, c // groups).transpose(0, 3, 1, 2, 4)
  return x.reshape(b * groups, h, w, c // groups)


class NeighborhoodAttention(nn.Module):
  """kxk neighbourhood attention (see module doc): (B, H, W, C) -> same."""

  num_heads: int
  kernel_size: int = 7
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h0, w0, c = x.shape
    k, heads = self.kernel_size, self.num_heads
    hd = c // heads
    x = jnp.pad(x, ((0, 0), (0, max(k - h0, 0)), (0, max(k - w0, 0)), (0, 0)))
    h, w = x.shape[1:3]
    qkv = layers.dense(3 * c, ops=self.ops, axes=(layers.EMBED, layers.HEADS),
                       dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, h, w, 3, heads, hd)
    # The reference scales q before q k^T (NATTEN's convention).
    q = (qkv[..., 0, :, :] * hd**-0.5).reshape(b, h * w, heads, hd)
    keys_h, rel_h = neighbourhood_index(h, k)
    keys_w, rel_w = neighbourhood_index(w, k)

    def neighbourhoods(t):  # (B, H, W, heads, d) -> (B, HW, k*k, heads, d)
      t = t[:, keys_h][:, :, :, keys_w].transpose(0, 1, 3, 2, 4, 5, 6)
      return t.reshape(b, h * w, k * k, heads, hd)

    kn = neighbourhoods(qkv[..., 1, :, :])
    vn = neighbourhoods(qkv[..., 2, :, :])
    rpb = self.param(
        "rpb", nn.with_logical_partitioning(
            nn.initializers.truncated_normal(0.02), (None, None, None)),
        (heads, 2 * k - 1, 2 * k - 1), jnp.float32)
    bias = rpb[:, rel_h[:, :, None, None], rel_w[None, None]]  # h,H,k,W,k
    bias = bias.transpose(0, 1, 3, 2, 4).reshape(heads, h * w, k * k)
    logits = layers.einsum(ops=self.ops, name="qk_einsum")(
        "bnhd,bnmhd->bhnm", q, kn)
    probs = jax.nn.softmax(logits.astype(jnp.float32) + bias, axis=-1)
    out = layers.einsum(ops=self.ops, name="av_einsum")(
        "bhnm,bnmhd->bnhd", probs.astype(self.dtype), vn)
    out = out.reshape(b, h, w, c)[:, :h0, :w0]
    return layers.dense(c, ops=self.ops, axes=(layers.HEADS, layers.EMBED),
                        dtype=self.dtype, name="proj")(out)


class OffsetNetwork(nn.Module):
  """theta_offset: (B*g, H, W, C/g) group queries -> (B*g, H/r, W/r, 2)."""

  stride: int
  kernel_size: int
  layer_norm_eps: float = 1e-5
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array) -> jax.Array:
    k, cg = self.kernel_size, q.shape[-1]
    pad = k // 2 if k != self.stride else 0
    x = layers.conv(cg, (k, k), ops=self.ops, strides=self.stride,
                    padding=((pad, pad), (pad, pad)), feature_group_count=cg,
                    dtype=self.dtype, name="dwconv")(q)
    x = layers.layer_norm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                          name="norm")(x)
    x = nn.gelu(x, approximate=False)
    # Channel 0 is the y offset, 1 the x offset (the reference's order).
    return layers.conv(2, (1, 1), ops=self.ops, use_bias=False,
                       dtype=self.dtype, name="proj")(x)


class DeformableAttention(nn.Module):
  """Deformable multi-head attention (see module doc): (B, H, W, C) -> same.

  Attributes:
    num_heads, groups: the heads of a group share its offsets; channels
      split group-major as in the reference.
    offset_stride: r, the reference-point grid is (ceil(H/r), ceil(W/r)).
    offset_kernel: side of the offset network's depthwise conv.
    offset_range_factor: < 0: clip positions to [-1, 1] (DAT++); >= 0:
      tanh-bounded offsets of at most factor / (n - 1), no clip.
    rpe_size: nominal (H, W) of the map for the (heads, 2H-1, 2W-1) bias
      table, or None for no deformable relative position bias.
  """

  num_heads: int
  groups: int
  offset_stride: int
  offset_kernel: int
  offset_range_factor: float = -1.0
  rpe_size: tuple[int, int] | None = None
  layer_norm_eps: float = 1e-5
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  def _positions(self, q: jax.Array) -> jax.Array:
    """(B*g, hk, wk, 2) float32 (y, x) sampling positions in [-1, 1]."""
    offset = OffsetNetwork(self.offset_stride, self.offset_kernel,
                           self.layer_norm_eps, self.ops, self.dtype,
                           name="conv_offset")(q).astype(jnp.float32)
    hk, wk = offset.shape[1:3]
    if min(hk, wk) < 2:  # so also maps of side 1 (hk <= H)
      raise ValueError(
          f"DeformableAttention: offset stride {self.offset_stride} turns the "
          f"{q.shape[1]}x{q.shape[2]} map into {hk}x{wk} reference points; "
          "DAT needs at least 2x2 of both (it divides by n - 1). Use larger "
          "images, a smaller patch_size or smaller offset_strides.")
    ref = jnp.asarray(normalised_grid(hk, wk, 0.5))
    if self.offset_range_factor >= 0:
      scale = jnp.asarray([1.0 / (hk - 1.0), 1.0 / (wk - 1.0)])
      return jnp.tanh(offset) * scale * self.offset_range_factor + ref
    return jnp.clip(offset + ref, -1.0, 1.0)

  def _rpe_bias(self, pos: jax.Array, b: int, h: int, w: int) -> jax.Array:
    """(B, heads, HW, Ns) bias sampled at half the query-key displacement."""
    heads, g = self.num_heads, self.groups
    th, tw = 2 * self.rpe_size[0] - 1, 2 * self.rpe_size[1] - 1
    table = self.param(
        "rpe_table", nn.with_logical_partitioning(
            nn.initializers.truncated_normal(0.01), (None, None, None)),
        (heads, th, tw), jnp.float32)
    table = table.reshape(g, heads // g, th, tw).transpose(0, 2, 3, 1)
    table = jnp.broadcast_to(table[None], (b,) + table.shape).reshape(
        b * g, th, tw, heads // g)
    disp = (jnp.asarray(normalised_grid(h, w, 0.0)).reshape(1, -1, 1, 2)
            - pos.reshape(b * g, 1, -1, 2)) * 0.5  # (B*g, HW, Ns, (y, x))
    bias = grid_sample(table, disp[..., ::-1], align_corners=True)
    return bias.reshape(b, g, h * w, -1, heads // g).transpose(
        0, 1, 4, 2, 3).reshape(b, heads, h * w, -1)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    heads, g = self.num_heads, self.groups
    hd = c // heads
    proj = lambda name: layers.dense(
        c, ops=self.ops, axes=(layers.EMBED, layers.HEADS), dtype=self.dtype,
        name=name)
    q = proj("proj_q")(x)
    pos = self._positions(_split_groups(q, g))
    hk, wk = pos.shape[1:3]
    # Sampling stays float32: positions are not quantised.
    sampled = grid_sample(_split_groups(x, g).astype(jnp.float32),
                          pos[..., ::-1], align_corners=True)
    sampled = sampled.reshape(b, g, hk * wk, c // g).transpose(0, 2, 1, 3)
    sampled = sampled.reshape(b, hk * wk, c).astype(self.dtype)
    k = proj("proj_k")(sampled).reshape(b, hk * wk, heads, hd)
    v = proj("proj_v")(sampled).reshape(b, hk * wk, heads, hd)
    logits = layers.einsum(ops=self.ops, name="qk_einsum")(
        "bqhd,bkhd->bhqk", q.reshape(b, h * w, heads, hd), k)
    logits = logits.astype(jnp.float32) * hd**-0.5  # scaled after, as torch
    if self.rpe_size is not None:
      logits = logits + self._rpe_bias(pos, b, h, w)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = layers.einsum(ops=self.ops, name="av_einsum")(
        "bhqk,bkhd->bqhd", probs, v).reshape(b, h, w, c)
    return layers.dense(c, ops=self.ops, axes=(layers.HEADS, layers.EMBED),
                        dtype=self.dtype, name="proj_out")(out)


class ConvMlp(nn.Module):
  """DAT++ ConvFFN: Linear(C -> hidden), h + dwconv3x3(h), GELU, Linear."""

  hidden: int
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    y = layers.dense(self.hidden, ops=self.ops, axes=(layers.EMBED, layers.MLP),
                     dtype=self.dtype, name="fc1")(x)
    y = y + layers.conv(self.hidden, (3, 3), ops=self.ops, padding=_PAD1,
                        feature_group_count=self.hidden, dtype=self.dtype,
                        name="dwconv")(y)
    y = nn.gelu(y, approximate=False)
    return layers.dense(c, ops=self.ops, axes=(layers.MLP, layers.EMBED),
                        dtype=self.dtype, name="fc2")(y)


class DATBlock(nn.Module):
  """LPU (depthwise 3x3, residual outside drop-path, as the reference) +
  pre-norm attention ('N' or 'D') + ConvFFN: (B, H, W, C) -> same."""

  attention: nn.Module
  mlp_ratio: float
  drop_path: float
  layer_norm_eps: float = 1e-5
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    c = x.shape[-1]
    x = x + layers.conv(c, (3, 3), ops=self.ops, padding=_PAD1,
                        feature_group_count=c, dtype=self.dtype, name="lpu")(x)
    drop = layers.DropPath(self.drop_path, name="drop_path")
    norm = lambda name: layers.layer_norm(epsilon=self.layer_norm_eps,
                                          dtype=self.dtype, name=name)
    x = x + drop(self.attention(norm("norm1")(x)), deterministic=not train)
    y = ConvMlp(int(self.mlp_ratio * c), self.ops, self.dtype,
                name="mlp")(norm("norm2")(x))
    return x + drop(y, deterministic=not train)


class DAT(nn.Module):
  """DAT++ backbone; defaults are DAT-T (dat_tiny.yaml).

  Attributes:
    image_size: nominal input side; sizes the deformable bias tables (any H,
      W that are multiples of the stem stride are accepted).
    patch_size: each stem conv has stride patch_size // 2 (the reference's
      rule), so the stem stride is (patch_size // 2)^2: 4 for 4, 1 for 2.
    dim_stem: stem width; a 1x1 projection to dims[0] follows if different.
    dims, depths, num_heads, groups: per stage (heads % groups == 0).
    stage_spec: one string of 'N'/'D' per stage (length = depth); None is
      the DAT++ pattern: N, D alternating in stages 1-3, all D in stage 4.
    offset_strides, offset_kernels: r and the depthwise kernel of each
      stage's offset network (8, 4, 2, 1 and 9, 7, 5, 3 for DAT-T).
    offset_range_factor: -1 clips positions to the map (DAT++).
    nat_kernels: neighbourhood attention window per stage.
    mlp_ratio: ConvFFN expansion; drop_path_rate: linear over all blocks.
    use_rpe: the deformable relative position bias. The LPU and the ConvFFN
      depthwise conv are always on, as in dat_tiny.yaml.
  """

  image_size: int = 224
  patch_size: int = 4
  dim_stem: int = 64
  dims: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 4, 18, 2)
  num_heads: Sequence[int] = (2, 4, 8, 16)
  groups: Sequence[int] = (1, 2, 4, 8)
  stage_spec: Sequence[str] | None = None
  offset_strides: Sequence[int] = (8, 4, 2, 1)
  offset_kernels: Sequence[int] = (9, 7, 5, 3)
  offset_range_factor: float = -1.0
  nat_kernels: Sequence[int] = (7, 7, 7, 7)
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.2
  use_rpe: bool = True
  layer_norm_eps: float = 1e-5
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  def specs(self) -> tuple[str, ...]:
    """The attention letters of every stage, checked against the fields."""
    n = len(self.depths)
    lengths = {k: len(getattr(self, k)) for k in (
        "dims", "num_heads", "groups", "offset_strides", "offset_kernels",
        "nat_kernels") + (("stage_spec",) if self.stage_spec else ())}
    if set(lengths.values()) != {n}:
      raise ValueError(f"DAT: depths has {n} stages but the lengths are "
                       f"{lengths}; give one entry per stage.")
    if self.patch_size < 2 or self.patch_size % 2:
      raise ValueError(f"DAT: patch_size must be even and >= 2, got "
                       f"{self.patch_size}.")
    specs = tuple(self.stage_spec or (
        ("ND" * d)[:d] if s < n - 1 else "D" * d
        for s, d in enumerate(self.depths)))
    for s, (spec, d, dim, heads, g, k) in enumerate(zip(
        specs, self.depths, self.dims, self.num_heads, self.groups,
        self.nat_kernels)):
      if len(spec) != d or set(spec) - {"N", "D"}:
        raise ValueError(
            f"DAT: stage_spec[{s}]={spec!r} must be {d} letter(s) of 'N' "
            "(neighbourhood) or 'D' (deformable), one per block.")
      if dim % heads or heads % g or k % 2 == 0:
        raise ValueError(f"DAT stage {s}: dims {dim} must divide by num_heads"
                         f" {heads}, num_heads by groups {g}, and nat_kernels "
                         f"must be odd (got {k}), as NATTEN's.")
    return specs

  def _attention(self, kind: str, s: int, side: int) -> nn.Module:
    # parent=None: the block adopts it as its `attention` child.
    if kind == "N":
      return NeighborhoodAttention(self.num_heads[s], self.nat_kernels[s],
                                   self.ops, self.dtype, parent=None)
    return DeformableAttention(
        self.num_heads[s], self.groups[s], self.offset_strides[s],
        self.offset_kernels[s], self.offset_range_factor,
        (side, side) if self.use_rpe else None, self.layer_norm_eps,
        self.ops, self.dtype, parent=None)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    """images: (B, H, W, 3) -> {'stages': 4 x (B, H_i, W_i, C_i), 'pooled'}."""
    specs = self.specs()
    stride = self.patch_size // 2
    check_images(images, "DAT", multiple=stride * stride)
    norm = lambda name: layers.layer_norm(epsilon=self.layer_norm_eps,
                                          dtype=self.dtype, name=name)
    conv = lambda feats, s, name, bias=True: layers.conv(
        feats, (3, 3), ops=self.ops, strides=s, padding=_PAD1, use_bias=bias,
        dtype=self.dtype, name=name)
    x = conv(self.dim_stem // 2, stride, "stem_conv1")(
        images.astype(self.dtype))
    x = nn.gelu(norm("stem_norm1")(x), approximate=False)
    x = norm("stem_norm2")(conv(self.dim_stem, stride, "stem_conv2")(x))

    # Nominal map side per stage (sizes the bias tables): 56..7 at 224.
    side = math.ceil(math.ceil(self.image_size / stride) / stride)
    total = sum(self.depths)
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    stages, k = [], 0
    for s, spec in enumerate(specs):
      if s > 0:
        x = conv(self.dims[s], 2, f"stage{s - 1}_down", bias=False)(x)
        x = norm(f"stage{s - 1}_down_norm")(x)
        side = math.ceil(side / 2)
      if x.shape[-1] != self.dims[s]:
        x = layers.dense(self.dims[s], ops=self.ops,
                         axes=(layers.MLP, layers.EMBED), dtype=self.dtype,
                         name=f"stage{s}_proj")(x)
      for j, kind in enumerate(spec):
        x = DATBlock(self._attention(kind, s, side), self.mlp_ratio, rates[k],
                     self.layer_norm_eps, self.ops, self.dtype,
                     name=f"stage{s}_block{j}")(x, train=train)
        k += 1
      stages.append(x)
    x = norm("norm")(x)
    return {"stages": tuple(stages), "pooled": jnp.mean(x, axis=(1, 2))}
