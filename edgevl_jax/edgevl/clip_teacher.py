"""A small CLIP teacher built from a config (the demo trains one from scratch).

`MODEL_SCHEMA` is the `model` sub-config of the clip_pretrain job (and of
the CKA job's from-scratch teacher); `build_hf_config` turns it into a
`transformers.CLIPConfig`, so the trained teacher is saved and reloaded as
an ordinary Hugging Face CLIP folder.
"""
from __future__ import annotations

from typing import Any

import transformers

from edgevl_jax.run import config as config_lib

f = config_lib.field
MODEL_SCHEMA: config_lib.Schema = {
    "vision_width": f(128, "image tower width"),
    "vision_layers": f(4, "image tower blocks"),
    "vision_heads": f(4, "image tower attention heads"),
    "patch_size": f(16, "patch side (image_size must be a multiple)"),
    "text_width": f(64, "text tower width"),
    "text_layers": f(1, "text tower blocks"),
    "text_heads": f(4, "text tower attention heads"),
    "projection_dim": f(64, "embedding size D shared by both towers"),
    "max_length": f(24, "tokens per text"),
    "vocab_size": f(400, "BPE vocabulary learnt from the captions"),
    "hidden_act": f("gelu", "'gelu' or 'quick_gelu'"),
}
del f
ACTIVATIONS = ("gelu", "quick_gelu")


def validate_model(config: Any, key: str = "model") -> None:
  """Positive sizes, a known activation, image_size divisible by the patch."""
  for name in MODEL_SCHEMA:
    if name != "hidden_act":
      config_lib.require_positive(config, f"{key}.{name}", integer=True)
  config_lib.require(config, f"{key}.hidden_act", allowed=ACTIVATIONS)
  model = config_lib.get(config, key)
  if config.image_size % model.patch_size:
    raise ValueError(
        f"config.image_size={config.image_size} must be a multiple of "
        f"config.{key}.patch_size={model.patch_size}.")


def build_hf_config(m: Any, *, image_size: int, vocab_size: int
                    ) -> transformers.CLIPConfig:
  """A `transformers.CLIPConfig` for a teacher described by MODEL_SCHEMA."""
  act = m.hidden_act
  return transformers.CLIPConfig(
      text_config=dict(
          vocab_size=vocab_size, hidden_size=m.text_width,
          intermediate_size=4 * m.text_width,
          num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
          max_position_embeddings=m.max_length, hidden_act=act,
          bos_token_id=0, eos_token_id=1, pad_token_id=1),
      vision_config=dict(
          hidden_size=m.vision_width, intermediate_size=4 * m.vision_width,
          num_hidden_layers=m.vision_layers,
          num_attention_heads=m.vision_heads, image_size=image_size,
          patch_size=m.patch_size, hidden_act=act),
      projection_dim=m.projection_dim)
