"""Swin Transformer backbone (Liu et al., ICCV 2021) for edge students.

Window attention with relative position bias tables, shifted windows with the
cyclic-shift attention mask (-100 between regions), patch merging between
stages. Padding follows the reference and Hugging Face `SwinModel`: a feature
map not divisible by the window is zero-padded at the bottom/right after the
first LayerNorm and cropped after attention; an odd map is padded before
patch merging. A stage whose smaller side is <= window uses one window of
that side and no shift (so the 7x7 last stage of a 224 model is not shifted).

Output of `Swin.__call__(images, train)`: a dict with
  stages: one (B, H_i, W_i, C_i) map per stage, the output of the last block
    of each stage before patch merging (blocks 1, 3, 9, 11 for depths
    2-2-6-2, blocks 1, 3, 21, 23 for 2-2-18-2);
  pooled: (B, C_last) average over tokens after the final LayerNorm.

Hugging Face `SwinModel` checkpoints convert one to one (`from_hf_config`,
`HF_MAPPING` below); the relative position index is recomputed from the
window, not read.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax.models import hf_io
from edgevl_jax.models import hf_mapping
from edgevl_jax.models import layers
from edgevl_jax.models.heads import check_images
from edgevl_jax.models.vit import Attention, Mlp

# Additive logit between tokens from different regions of a shifted window.
_MASK_VALUE = -100.0


def relative_position_index(window: int) -> np.ndarray:
  """(window^2, window^2) index into the ((2w-1)^2, heads) bias table."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window),
                                indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel = rel + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(height: int, width: int, window: int,
                        shift: int) -> np.ndarray:
  """(num_windows, window^2, window^2) additive mask for shifted windows."""
  def regions(n):
    idx = np.arange(n)
    return (idx >= n - window).astype(int) + (idx >= n - shift).astype(int)
  labels = regions(height)[:, None] * 3 + regions(width)[None, :]
  labels = window_partition(labels[None, :, :, None], window)[..., 0]
  diff = labels[:, None, :] - labels[:, :, None]
  return np.where(diff != 0, _MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x, window: int):
  """(B, H, W, C) -> (B * H/w * W/w, w * w, C), windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, b: int, h: int,
                   w: int) -> jax.Array:
  """Inverse of `window_partition`: -> (B, H, W, C)."""
  c = windows.shape[-1]
  x = windows.reshape(b, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class SwinBlock(nn.Module):
  """(Shifted) window attention block: (B, H, W, C) -> (B, H, W, C)."""

  num_heads: int
  window_size: int
  shift_size: int
  mlp_ratio: float
  drop_path: float
  layer_norm_eps: float
  qkv_bias: bool = True
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    b, h, w, c = x.shape
    ws, shift = self.window_size, self.shift_size
    drop = layers.DropPath(self.drop_path, name="drop_path")
    y = layers.layer_norm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                          name="norm1")(x)
    hp, wp = h + (-h) % ws, w + (-w) % ws
    y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    windows = window_partition(y, ws)

    table = self.param(
        "relative_position_bias_table",
        nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                     (None, None)),
        ((2 * ws - 1) ** 2, self.num_heads), jnp.float32)
    bias = table[relative_position_index(ws).reshape(-1)]
    bias = bias.reshape(ws * ws, ws * ws, -1).transpose(2, 0, 1)[None]
    if shift:
      mask = jnp.asarray(shifted_window_mask(hp, wp, ws, shift))
      # Windows are batch-major, so the per-window mask tiles over the batch.
      bias = jnp.tile(bias + mask[:, None], (b, 1, 1, 1))
    y = Attention(self.num_heads, self.qkv_bias, self.ops, self.dtype,
                  name="attn")(windows, bias)
    y = window_reverse(y, ws, b, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + drop(y[:, :h, :w], deterministic=not train)
    y = layers.layer_norm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                          name="norm2")(x)
    y = Mlp(int(self.mlp_ratio * c), self.ops, self.dtype, name="mlp")(y)
    return x + drop(y, deterministic=not train)


class PatchMerging(nn.Module):
  """2x2 neighbourhood concat, LayerNorm(4C), Linear(4C -> 2C, no bias)."""

  layer_norm_eps: float = 1e-5
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
    h, w, c = x.shape[1:]
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                         x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = layers.layer_norm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                          name="norm")(x)
    # 4C input is not EMBED, so the kernel never names one mesh axis twice.
    return layers.dense(2 * c, ops=self.ops, axes=(layers.MLP, layers.EMBED),
                        use_bias=False, dtype=self.dtype, name="reduction")(x)


class Swin(nn.Module):
  """Swin backbone. Swin-T: depths 2-2-6-2; Swin-S: 2-2-18-2.

  Attributes:
    image_size: nominal input side (used to build init inputs); any H, W that
      are multiples of patch_size are accepted.
    patch_size: patch side of the stem (4).
    width: channels of stage 1 (96, "embed_dim" in Swin); stage i has
      width * 2^i.
    depths, num_heads: blocks and heads per stage.
    window_size: attention window side (7).
    mlp_ratio: MLP hidden / width (4).
    drop_path_rate: stochastic depth of the last block (linear from 0 over
      all blocks).
    quantize_patch_embed: run the patch-embedding conv through `ops` (i.e.
      int8 in a quantised student). False (default): it stays float, as in
      the EdgeVL reference's quantised Swin; every other Dense and the
      attention matmuls follow `ops`.
    remat: recompute each block's activations in the backward pass instead
      of storing them (activation memory of one block, ~1/3 more compute).
  """

  image_size: int = 224
  patch_size: int = 4
  width: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.2
  layer_norm_eps: float = 1e-5
  qkv_bias: bool = True
  quantize_patch_embed: bool = False
  remat: bool = False
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    """images: (B, H, W, 3), H and W multiples of patch_size."""
    if len(self.depths) != len(self.num_heads):
      raise ValueError(
          f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} "
          "must have the same length (one entry per stage).")
    check_images(images, "Swin", multiple=self.patch_size)
    x = layers.conv(
        self.width, (self.patch_size, self.patch_size),
        ops=self.ops if self.quantize_patch_embed else layers.Ops(),
        strides=self.patch_size, padding="VALID", dtype=self.dtype,
        name="patch_embed")(images.astype(self.dtype))
    # The patch norm is a plain nn.LayerNorm in the reference (eps 1e-5).
    x = layers.layer_norm(epsilon=1e-5, dtype=self.dtype, name="patch_norm")(x)

    total = sum(self.depths)
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    stages, k = [], 0
    for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      if s > 0:
        x = PatchMerging(ops=self.ops, dtype=self.dtype,
                         name=f"stage{s - 1}_merge")(x)
      side = min(x.shape[1], x.shape[2])
      window = min(side, self.window_size)
      block = (nn.remat(SwinBlock, static_argnums=(2,)) if self.remat
               else SwinBlock)
      for j in range(depth):
        shift = (self.window_size // 2
                 if j % 2 and side > self.window_size else 0)
        x = block(heads, window, shift, self.mlp_ratio, rates[k],
                  self.layer_norm_eps, self.qkv_bias, self.ops,
                  self.dtype, name=f"stage{s}_block{j}")(x, train)
        k += 1
      stages.append(x)
    x = layers.layer_norm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                          name="norm")(x)
    return {"stages": tuple(stages), "pooled": jnp.mean(x, axis=(1, 2))}


# Hugging Face SwinModel / SwinForImageClassification.

# Student field -> SwinConfig key, where the names differ.
HF_FIELDS = {"width": "embed_dim"}

_BLOCK, _HF_BLOCK = r"stage(\d+)_block(\d+)", r"encoder.layers.\1.blocks.\2"
HF_MAPPING = hf_mapping.StudentMapping(
    model_type="swin", prefix="swin.",
    rules=(
        (r"patch_embed", "embeddings.patch_embeddings.projection"),
        (r"patch_norm", "embeddings.norm"),
        (rf"{_BLOCK}/relative_position_bias_table",
         rf"{_HF_BLOCK}.attention.self.relative_position_bias_table"),
        *hf_mapping.block_rules(_BLOCK, _HF_BLOCK, "attention.self"),
        (r"stage(\d+)_merge/(norm|reduction)",
         r"encoder.layers.\1.downsample.\2"),
        (r"norm", "layernorm"),
    ),
    renames=(
        (r"\.attention\.relative_position_bias\.", r".attention.self."),
        (r"\.attention\.([qkv])_proj\.", r".attention.self.\1_proj."),
    ) + hf_mapping.BLOCK_RENAMES)


def from_hf_config(cfg: dict[str, Any], path: str = "") -> dict[str, Any]:
  """`Swin` fields from a SwinConfig dict (KeyError names an absent key)."""
  hf_io.require_values(cfg, path, num_channels=(3,), hidden_act=("gelu",),
                       use_absolute_embeddings=(False,))
  return dict(image_size=hf_io.square_size(cfg, "image_size", path),
              patch_size=hf_io.square_size(cfg, "patch_size", path),
              width=cfg["embed_dim"], depths=tuple(cfg["depths"]),
              num_heads=tuple(cfg["num_heads"]),
              window_size=cfg["window_size"], mlp_ratio=cfg["mlp_ratio"],
              qkv_bias=cfg.get("qkv_bias", True),
              layer_norm_eps=cfg["layer_norm_eps"],
              drop_path_rate=cfg.get("drop_path_rate", 0.1))
