"""Vision Transformer backbone (Dosovitskiy et al., 2021) for edge students.

Pre-norm encoder blocks with exact GELU, a CLS token and learned absolute
position embeddings; the layout of Hugging Face `ViTModel` so ImageNet
checkpoints convert one to one (`from_hf_config`, `HF_MAPPING` below). Every
matmul goes through the injected `layers.Ops`, so AQT int8 quantises the
patch embedding, qkv, attention out, MLP and both attention matmuls (q k^T
and attn v).

Output of `ViT.__call__(images, train)`: a dict with
  stages: four (B, 1 + N, width) token maps, the outputs of blocks
    `stage_blocks(depth)` (blocks 1, 3, 9, 11 for 12 blocks), CLS included;
  pooled: (B, width) mean over all tokens (CLS included) of the
    final-LayerNorm output (the EdgeVL ViT pooling).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.models import hf_io
from edgevl_jax.models import hf_mapping
from edgevl_jax.models import layers
from edgevl_jax.models.heads import check_images

# The OFA-KD CKA convention for 12-block transformers (0-based block indices).
_REFERENCE_STAGE_BLOCKS = (1, 3, 9, 11)


def stage_blocks(depth: int) -> tuple[int, int, int, int]:
  """Blocks whose outputs are the four CKA stages.

  Blocks 1, 3, 9, 11 of 12, scaled proportionally for other depths: block
  ceil((i + 1) * depth / 12) - 1 for each reference index i, so a 24-block
  model uses 3, 7, 19, 23 and a 2-block model 0, 0, 1, 1.
  """
  if depth < 1:
    raise ValueError(f"depth must be >= 1, got {depth}.")
  return tuple(
      max(0, math.ceil((i + 1) * depth / 12) - 1) for i in _REFERENCE_STAGE_BLOCKS
  )


class Attention(nn.Module):
  """Multi-head self-attention with fused qkv; shared by ViT and Swin.

  Attributes:
    num_heads: attention heads; head_dim = width // num_heads.
    qkv_bias: whether q, k, v projections have a bias.
  """

  num_heads: int
  qkv_bias: bool = True
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x: (B, N, C); bias: additive logits broadcastable to (B, heads, N, N)."""
    b, n, c = x.shape
    if c % self.num_heads:
      raise ValueError(
          f"width {c} is not divisible by num_heads {self.num_heads}.")
    head_dim = c // self.num_heads
    qkv = layers.dense(
        3 * c, ops=self.ops, axes=(layers.EMBED, layers.HEADS),
        use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = layers.einsum(ops=self.ops, name="qk_einsum")(
        "bqhd,bkhd->bhqk", q, k)
    # Scale after the matmul, as PyTorch does, for bit-level parity.
    logits = logits.astype(jnp.float32) * head_dim**-0.5
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = layers.einsum(ops=self.ops, name="av_einsum")(
        "bhqk,bkhd->bqhd", probs, v)
    out = out.reshape(b, n, c)
    return layers.dense(
        c, ops=self.ops, axes=(layers.HEADS, layers.EMBED), dtype=self.dtype,
        name="proj")(out)


class Mlp(nn.Module):
  """Two-layer GELU MLP: (..., C) -> (..., hidden) -> (..., C)."""

  hidden: int
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = layers.dense(self.hidden, ops=self.ops, axes=(layers.EMBED, layers.MLP),
                     dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return layers.dense(c, ops=self.ops, axes=(layers.MLP, layers.EMBED),
                        dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block with stochastic depth on both branches."""

  num_heads: int
  mlp_dim: int
  drop_path: float
  layer_norm_eps: float
  qkv_bias: bool = True
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: (B, N, C) -> (B, N, C)."""
    drop = layers.DropPath(self.drop_path, name="drop_path")
    y = layers.layer_norm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                          name="norm1")(x)
    y = Attention(self.num_heads, self.qkv_bias, self.ops, self.dtype,
                  name="attn")(y)
    x = x + drop(y, deterministic=not train)
    y = layers.layer_norm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                          name="norm2")(x)
    y = Mlp(self.mlp_dim, self.ops, self.dtype, name="mlp")(y)
    return x + drop(y, deterministic=not train)


class ViT(nn.Module):
  """ViT backbone. Ti/16: 192/12/3, S/16: 384/12/6, B/16: 768/12/12.

  Attributes:
    image_size: the only accepted input height and width.
    patch_size: square patch side; image_size must be a multiple.
    width: token width; depth: number of blocks; num_heads: attention heads.
    mlp_dim: MLP hidden width (default 4 * width).
    drop_path_rate: stochastic depth of the last block (linear from 0).
    remat: recompute each block's activations in the backward pass instead
      of storing them (activation memory of one block, ~1/3 more compute).
    layer_norm_eps: LayerNorm epsilon (1e-6 as in timm; HF checkpoints say
      1e-12 and the loader takes it from config.json).
  """

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  drop_path_rate: float = 0.1
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  remat: bool = False
  ops: layers.Ops = layers.Ops()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    """images: (B, image_size, image_size, 3) -> {'stages', 'pooled'}."""
    if self.image_size % self.patch_size:
      raise ValueError(
          f"image_size {self.image_size} must be a multiple of patch_size "
          f"{self.patch_size}.")
    check_images(images, "ViT", size=(self.image_size, self.image_size))
    x = layers.conv(
        self.width, (self.patch_size, self.patch_size), ops=self.ops,
        strides=self.patch_size, padding="VALID", dtype=self.dtype,
        name="patch_embed")(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    cls = self.param(
        "cls_token",
        nn.with_logical_partitioning(nn.initializers.zeros,
                                     (None, None, layers.EMBED)),
        (1, 1, self.width), jnp.float32)
    pos = self.param(
        "pos_embed",
        nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                     (None, None, layers.EMBED)),
        (1, x.shape[1] + 1, self.width), jnp.float32)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (b, 1, self.width)).astype(self.dtype), x],
        axis=1) + pos.astype(self.dtype)

    taps = stage_blocks(self.depth)
    rates = [self.drop_path_rate * i / max(self.depth - 1, 1)
             for i in range(self.depth)]
    outputs = []
    # remat: each block's activations are recomputed in the backward pass
    # instead of stored (same parameter names; `train` is static).
    block = (nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat
             else EncoderBlock)
    for i in range(self.depth):
      x = block(
          self.num_heads, self.mlp_dim or 4 * self.width, rates[i],
          self.layer_norm_eps, self.qkv_bias, self.ops, self.dtype,
          name=f"block{i}")(x, train)
      outputs.append(x)
    x = layers.layer_norm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                          name="norm")(x)
    return {"stages": tuple(outputs[i] for i in taps),
            "pooled": jnp.mean(x, axis=1)}


# Hugging Face ViTModel / ViTForImageClassification.

# Student field -> ViTConfig key, where the names differ.
HF_FIELDS = {"width": "hidden_size", "depth": "num_hidden_layers",
             "num_heads": "num_attention_heads", "mlp_dim": "intermediate_size"}

HF_MAPPING = hf_mapping.StudentMapping(
    model_type="vit", prefix="vit.",
    rules=(
        (r"cls_token", "embeddings.cls_token"),
        (r"pos_embed", "embeddings.position_embeddings"),
        (r"patch_embed", "embeddings.patch_embeddings.projection"),
        *hf_mapping.block_rules(r"block(\d+)", r"encoder.layer.\1",
                                "attention.attention"),
        (r"norm", "layernorm"),
    ),
    renames=(
        (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
        (r"\.attention\.([qkv])_proj\.", r".attention.attention.\1_proj."),
    ) + hf_mapping.BLOCK_RENAMES)


def from_hf_config(cfg: dict[str, Any], path: str = "") -> dict[str, Any]:
  """`ViT` fields from a ViTConfig dict (KeyError names an absent key)."""
  hf_io.require_values(cfg, path, num_channels=(3,), hidden_act=("gelu",))
  return dict(image_size=hf_io.square_size(cfg, "image_size", path),
              patch_size=hf_io.square_size(cfg, "patch_size", path),
              width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
              num_heads=cfg["num_attention_heads"],
              mlp_dim=cfg["intermediate_size"],
              layer_norm_eps=cfg["layer_norm_eps"],
              qkv_bias=cfg.get("qkv_bias", True))
