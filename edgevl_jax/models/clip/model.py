"""CLIP (Radford et al. 2021) teacher in Flax, with Hugging Face naming.

The module tree mirrors `transformers.CLIPModel` (`vision_model.embeddings.
patch_embedding`, `text_model.encoder.layers_3.self_attn.q_proj`, ...), so
converting a checkpoint is a rename plus transposes (see convert.py).
Both towers are pre-LN transformers; the vision tower pools the post-LN class
token, the text tower the first end-of-text token under a causal mask.

Every matmul goes through `layers.dense` / `layers.einsum` / `layers.conv`
with the injected `ops`, so AQT quantises the teacher without forking it.

Usage (through the package, `from edgevl_jax.models import clip`):
  clip.check_clip_folder(path)   # cheap: config, weight headers, tokenizer
  model, params = clip.load_pretrained(path)
  emb = model.apply({'params': params}, images, method='encode_image')
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgevl_jax.models import layers
from edgevl_jax.models.clip.config import ACTIVATIONS
from edgevl_jax.models.clip.config import CLIPSpec
from edgevl_jax.models.clip.config import TextConfig
from edgevl_jax.models.clip.config import TowerConfig
from edgevl_jax.models.clip.config import VisionConfig


def _normal(std: float, axes: tuple[str | None, ...]) -> Callable:
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class Attention(nn.Module):
  """Multi-head self-attention with HF's q/k/v/out projections.

  Attributes:
    num_heads: attention heads; head width = hidden // num_heads.
  """

  num_heads: int
  dtype: Any = jnp.float32
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x: (B, T, W); mask: bool, broadcastable to (B, heads, T, T)."""
    b, t, w = x.shape
    h = self.num_heads
    dense = functools.partial(layers.dense, ops=self.ops, dtype=self.dtype)
    q = dense(w, axes=(layers.EMBED, layers.HEADS), name="q_proj")(x)
    k = dense(w, axes=(layers.EMBED, layers.HEADS), name="k_proj")(x)
    v = dense(w, axes=(layers.EMBED, layers.HEADS), name="v_proj")(x)
    q, k, v = (a.reshape(b, t, h, w // h) for a in (q, k, v))
    q = q * jnp.asarray((w // h) ** -0.5, q.dtype)
    scores = layers.einsum(ops=self.ops, name="qk_einsum")(
        "bqhd,bkhd->bhqk", q, k)
    scores = scores.astype(jnp.float32)
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = layers.einsum(ops=self.ops, name="pv_einsum")(
        "bhqk,bkhd->bqhd", probs, v)
    return dense(w, axes=(layers.HEADS, layers.EMBED), name="out_proj")(
        out.reshape(b, t, w))


class MLP(nn.Module):
  """fc1 -> activation -> fc2."""

  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(layers.dense, ops=self.ops, dtype=self.dtype)
    y = dense(self.intermediate_size, axes=(layers.EMBED, layers.MLP),
              name="fc1")(x)
    y = ACTIVATIONS[self.hidden_act](y)
    return dense(x.shape[-1], axes=(layers.MLP, layers.EMBED), name="fc2")(y)


class EncoderLayer(nn.Module):
  """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

  config: TowerConfig
  dtype: Any = jnp.float32
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    c = self.config
    ln = functools.partial(layers.layer_norm, epsilon=c.layer_norm_eps,
                           dtype=self.dtype)
    x = x + Attention(c.num_heads, self.dtype, self.ops, name="self_attn")(
        ln(name="layer_norm1")(x), mask)
    return x + MLP(c.intermediate_size, c.hidden_act, self.dtype, self.ops,
                   name="mlp")(ln(name="layer_norm2")(x))


class Encoder(nn.Module):
  """Stack of `num_layers` blocks named `layers_{i}` (HF: `layers.{i}`)."""

  config: TowerConfig
  dtype: Any = jnp.float32
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, x: jax.Array,
               mask: jax.Array | None) -> tuple[jax.Array, ...]:
    """Returns the hidden state after every block, each (B, T, W)."""
    states = []
    for i in range(self.config.num_layers):
      x = EncoderLayer(self.config, self.dtype, self.ops, name=f"layers_{i}")(
          x, mask)
      states.append(x)
    return tuple(states)


class VisionEmbeddings(nn.Module):
  """Bias-free patch conv, a class token and learned positions."""

  config: VisionConfig
  dtype: Any = jnp.float32
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    w, p = c.hidden_size, c.patch_size
    x = layers.conv(w, (p, p), ops=self.ops, strides=p, padding="VALID",
                    use_bias=False, dtype=self.dtype,
                    name="patch_embedding")(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, w)
    cls = self.param("class_embedding", _normal(w ** -0.5, (layers.EMBED,)),
                     (w,), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, w))
    x = jnp.concatenate([cls, x], axis=1)
    pos = nn.Embed((c.image_size // p) ** 2 + 1, w, dtype=self.dtype,
                   param_dtype=jnp.float32,
                   embedding_init=_normal(0.02, (None, layers.EMBED)),
                   name="position_embedding")
    return x + pos(jnp.arange(x.shape[1]))[None]


class VisionTransformer(nn.Module):
  """HF `CLIPVisionModel`: embeddings, pre_layrnorm, encoder, post_layernorm."""

  config: VisionConfig
  dtype: Any = jnp.float32
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[tuple[jax.Array, ...],
                                                 jax.Array]:
    """images (B, H, W, C) -> (per-block states (B, T, W), pooled (B, W))."""
    c = self.config
    want = (c.image_size, c.image_size, c.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(
          f"CLIP vision tower: expected NHWC images (B, {want[0]}, {want[1]}, "
          f"{want[2]}), found shape {tuple(images.shape)}; resize to the "
          "config's image_size and normalise first.")
    ln = functools.partial(layers.layer_norm, epsilon=c.layer_norm_eps,
                           dtype=self.dtype)
    x = VisionEmbeddings(c, self.dtype, self.ops, name="embeddings")(images)
    x = ln(name="pre_layrnorm")(x)
    states = Encoder(c, self.dtype, self.ops, name="encoder")(x, None)
    return states, ln(name="post_layernorm")(states[-1][:, 0])


class TextEmbeddings(nn.Module):
  """Token embedding plus learned absolute positions."""

  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    c = self.config
    embed = functools.partial(nn.Embed, features=c.hidden_size,
                              dtype=self.dtype, param_dtype=jnp.float32)
    tok = embed(c.vocab_size, embedding_init=_normal(
        0.02, (layers.VOCAB, layers.EMBED)), name="token_embedding")
    pos = embed(c.max_position_embeddings, embedding_init=_normal(
        0.01, (None, layers.EMBED)), name="position_embedding")
    return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]


class TextTransformer(nn.Module):
  """HF `CLIPTextModel`: causal encoder pooled at the end-of-text token."""

  config: TextConfig
  dtype: Any = jnp.float32
  ops: layers.Ops = layers.Ops()

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None) -> jax.Array:
    """input_ids, attention_mask: (B, L) ints -> pooled (B, W)."""
    c = self.config
    length = input_ids.shape[-1]
    if input_ids.ndim != 2 or length > c.max_position_embeddings:
      raise ValueError(
          f"CLIP text tower: expected input_ids (B, L) with L <= "
          f"{c.max_position_embeddings}, found shape {tuple(input_ids.shape)};"
          " tokenize with max_length <= max_position_embeddings.")
    x = TextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
    # Causal mask combined with the key padding mask, as HF does.
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)
    states = Encoder(c, self.dtype, self.ops, name="encoder")(x, mask)
    x = layers.layer_norm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                          name="final_layer_norm")(states[-1])
    if c.eos_token_id == 2:
      # Checkpoints older than HF PR #24773 carry eos id 2; HF then pools at
      # the largest token id (CLIP's end-of-text is the last vocab entry).
      eot = jnp.argmax(input_ids, axis=-1)
    else:
      eot = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
    return jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]


class CLIP(nn.Module):
  """Two-tower CLIP with HF parameter names.

  Attributes:
    config: a `CLIPSpec`, or a `transformers.CLIPConfig` (converted to the
      hashable `CLIPSpec` on construction).
    dtype: compute dtype (float32; bfloat16 on accelerators). Params stay
      float32; embeddings and logits are returned in float32.
    ops: injected matmul / conv implementations (AQT plugs in here).
  """

  config: Any
  dtype: Any = jnp.float32
  ops: layers.Ops = layers.Ops()

  def __post_init__(self):
    if not isinstance(self.config, CLIPSpec):
      object.__setattr__(self, "config", CLIPSpec.from_hf(self.config))
    super().__post_init__()

  def setup(self):
    c = self.config
    self.vision_model = VisionTransformer(c.vision, self.dtype, self.ops)
    self.text_model = TextTransformer(c.text, self.dtype, self.ops)
    self.visual_projection = layers.dense(
        c.projection_dim, ops=self.ops, axes=(layers.EMBED, layers.CLASSES),
        use_bias=False, dtype=self.dtype,
        kernel_init=nn.initializers.normal(c.vision.hidden_size ** -0.5))
    self.text_projection = layers.dense(
        c.projection_dim, ops=self.ops, axes=(layers.EMBED, layers.CLASSES),
        use_bias=False, dtype=self.dtype,
        kernel_init=nn.initializers.normal(c.text.hidden_size ** -0.5))
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(c.logit_scale_init_value), ()), ())

  def image_features(self, images: jax.Array) -> dict[str, Any]:
    """Vision-tower features for CKA analysis.

    Args:
      images: (B, H, W, C) float32, already normalised.

    Returns:
      dict with `stages`: tuple of the hidden states after each encoder
      block, each (B, 1 + num_patches, W); `pooled`: post-LN class token
      (B, W).
    """
    stages, pooled = self.vision_model(images)
    return {"stages": stages, "pooled": pooled}

  def encode_image(self, images: jax.Array) -> jax.Array:
    """(B, H, W, C) normalised images -> projected, unnormalised (B, D)."""
    _, pooled = self.vision_model(images)
    return self.visual_projection(pooled).astype(jnp.float32)

  def encode_text(self, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None) -> jax.Array:
    """(B, L) token ids and 0/1 mask -> projected, unnormalised (B, D)."""
    pooled = self.text_model(input_ids, attention_mask)
    return self.text_projection(pooled).astype(jnp.float32)

  def __call__(self, images: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """HF `CLIPModel.forward`: L2-normalised embeddings and scaled logits.

    Returns:
      dict with image_embeds (B_i, D), text_embeds (B_t, D),
      logits_per_image (B_i, B_t) and logits_per_text (B_t, B_i).
    """
    img = l2_normalize(self.encode_image(images))
    txt = l2_normalize(self.encode_text(input_ids, attention_mask))
    logits_per_text = txt @ img.T * jnp.exp(self.logit_scale)
    return {"image_embeds": img, "text_embeds": txt,
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text}


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def _dummy_inputs(model: CLIP, image_size: int | None):
  v, t = model.config.vision, model.config.text
  size = v.image_size if image_size is None else image_size
  if size != v.image_size:
    raise ValueError(
        f"init_params: image_size={size} differs from the config's "
        f"vision_config.image_size={v.image_size}; the position table is "
        "sized by the config, so build the config with that image_size.")
  images = jnp.zeros((1, size, size, v.num_channels), jnp.float32)
  ids = jnp.full((1, t.max_position_embeddings), t.eos_token_id, jnp.int32)
  return images, ids, jnp.ones_like(ids)


def init_params(model: CLIP, rng: jax.Array, *,
                image_size: int | None = None) -> dict[str, Any]:
  """Random float32 params of `model` (plain arrays, no partition boxes).

  Args:
    model: a `CLIP`.
    rng: PRNG key.
    image_size: optional check of the training resolution against the
      config (the position table is sized by the config).
  """
  variables = jax.jit(model.init)(rng, *_dummy_inputs(model, image_size))
  return nn.unbox(variables)["params"]


def param_logical_specs(model: CLIP) -> Any:
  """Logical PartitionSpecs of the params (names from layers.py).

  Use with `nn.logical_to_mesh_sharding(specs, mesh,
  layers.LOGICAL_AXIS_RULES)` to FSDP-shard a large teacher.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          *_dummy_inputs(model, None))
  return nn.get_partition_spec(shapes)["params"]


def param_shardings(model: CLIP, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, Any]] = layers.LOGICAL_AXIS_RULES
                    ) -> Any:
  """NamedShardings for the params of `model` on `mesh` under `rules`."""
  return nn.logical_to_mesh_sharding(param_logical_specs(model), mesh,
                                     tuple(rules))
