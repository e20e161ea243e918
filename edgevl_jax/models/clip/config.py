"""Frozen, hashable view of a `transformers.CLIPConfig` for the Flax CLIP.

Linen module fields must be hashable; HF configs are not. `CLIPSpec.from_hf`
keeps what the Flax towers need (plus the original JSON, so `to_hf` writes
back what was read) and validates it with errors that name the bad key.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """Transformer shape shared by both towers (HF names in comments)."""

  hidden_size: int
  intermediate_size: int
  num_layers: int  # num_hidden_layers
  num_heads: int  # num_attention_heads
  hidden_act: str
  layer_norm_eps: float


@dataclasses.dataclass(frozen=True)
class VisionConfig(TowerConfig):
  image_size: int
  patch_size: int
  num_channels: int


@dataclasses.dataclass(frozen=True)
class TextConfig(TowerConfig):
  vocab_size: int
  max_position_embeddings: int
  eos_token_id: int


@dataclasses.dataclass(frozen=True)
class CLIPSpec:
  """Frozen, hashable view of a `transformers.CLIPConfig`.

  `hf_json` keeps the original config (token ids, names...) so that
  `to_hf()` writes back what was read; the typed fields win over it.
  """

  text: TextConfig
  vision: VisionConfig
  projection_dim: int
  logit_scale_init_value: float
  hf_json: str = dataclasses.field(default="", compare=False)

  @classmethod
  def from_hf(cls, config: Any) -> "CLIPSpec":
    """From a `transformers.CLIPConfig` (or an equivalent dict)."""
    d = config if isinstance(config, dict) else config.to_dict()
    if d.get("model_type", "clip") != "clip":
      raise ValueError(
          f"CLIP: config model_type is {d.get('model_type')!r}, expected "
          "'clip'; pass a transformers.CLIPConfig.")
    t, v = d["text_config"], d["vision_config"]
    for name, tower in (("text_config", t), ("vision_config", v)):
      if tower["hidden_act"] not in ACTIVATIONS:
        raise ValueError(
            f"CLIP: {name}.hidden_act={tower['hidden_act']!r} is not "
            f"supported; expected one of {sorted(ACTIVATIONS)}.")
      if tower["hidden_size"] % tower["num_attention_heads"]:
        raise ValueError(
            f"CLIP: {name}.hidden_size={tower['hidden_size']} is not "
            f"divisible by num_attention_heads={tower['num_attention_heads']}.")

    def tower_kw(c):
      return dict(hidden_size=c["hidden_size"],
                  intermediate_size=c["intermediate_size"],
                  num_layers=c["num_hidden_layers"],
                  num_heads=c["num_attention_heads"],
                  hidden_act=c["hidden_act"],
                  layer_norm_eps=float(c["layer_norm_eps"]))

    eos = t.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
      eos = eos[0]
    image_size, patch_size = v["image_size"], v["patch_size"]
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
      raise ValueError(
          f"CLIP: vision_config image_size={image_size!r} and patch_size="
          f"{patch_size!r} must be ints (square images and patches, as in HF).")
    return cls(
        text=TextConfig(vocab_size=t["vocab_size"],
                        max_position_embeddings=t["max_position_embeddings"],
                        eos_token_id=int(eos), **tower_kw(t)),
        vision=VisionConfig(image_size=image_size, patch_size=patch_size,
                            num_channels=v.get("num_channels", 3),
                            **tower_kw(v)),
        projection_dim=d["projection_dim"],
        logit_scale_init_value=float(d["logit_scale_init_value"]),
        hf_json=json.dumps(d, sort_keys=True, default=str))

  def to_hf(self) -> Any:
    """The equivalent `transformers.CLIPConfig`."""
    # transformers takes seconds to import; only saving a folder needs it.
    import transformers  # pylint: disable=g-import-not-at-top

    d = json.loads(self.hf_json) if self.hf_json else {}
    for key, tower, extra in (
        ("text_config", self.text,
         dict(vocab_size=self.text.vocab_size, eos_token_id=self.text.eos_token_id,
              max_position_embeddings=self.text.max_position_embeddings)),
        ("vision_config", self.vision,
         dict(image_size=self.vision.image_size,
              patch_size=self.vision.patch_size,
              num_channels=self.vision.num_channels))):
      sub = dict(d.get(key) or {})
      sub.update(hidden_size=tower.hidden_size,
                 intermediate_size=tower.intermediate_size,
                 num_hidden_layers=tower.num_layers,
                 num_attention_heads=tower.num_heads,
                 hidden_act=tower.hidden_act,
                 layer_norm_eps=tower.layer_norm_eps,
                 projection_dim=self.projection_dim, **extra)
      d[key] = sub
    d.update(projection_dim=self.projection_dim,
             logit_scale_init_value=self.logit_scale_init_value,
             model_type="clip", architectures=["CLIPModel"])
    for key in ("transformers_version", "_name_or_path"):
      d.pop(key, None)
    return transformers.CLIPConfig.from_dict(d)
