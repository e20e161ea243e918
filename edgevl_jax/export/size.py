"""Model size: parameters and bytes of the teacher and of fp32 / int8 students.

Nothing is materialised: teacher counts come from its HF `CLIPConfig` alone
(`jax.eval_shape` of the Flax CLIP's `init` restricted to the image tower, with
`clip_image_tower_count` as the closed-form cross-check), student counts from
`jax.eval_shape` of `students.build(...).init`.

Bytes:
  fp32: 4 bytes per parameter.
  int8 (the served artefact of `quant.convert`): 1 byte per quantised weight
    (every Dense / conv kernel; 0.5 byte for int4, i.e. two codes packed per
    byte as a deployment would store them), fp32 per-output-channel scales,
    fp32 static activation ranges, every other parameter (biases, norms,
    position tables, class token) fp32. BatchNorm running statistics are
    counted too (`batch_stats`, fp32): the device needs them.

The paper's headline: an int8 Swin-T (28 M parameters, about 28 MB) against
the ViT-g/14 fp32 image tower (about 1.01 B parameters, 4.05 GB), i.e. about
140x; `size_report` computes it.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax import quant

# Text towers only matter for building a full CLIPConfig; image towers are
# what the paper's size comparison counts.
_TEACHERS = {
    # OpenCLIP ViT-g/14 (laion2b_s34b_b88k), plain GELU.
    "vit_g14": dict(
        vision=dict(hidden_size=1408, intermediate_size=6144,
                    num_hidden_layers=40, num_attention_heads=16, patch_size=14,
                    image_size=224, hidden_act="gelu"),
        text=dict(hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=24, num_attention_heads=16,
                  hidden_act="gelu"),
        projection_dim=1024),
    # OpenAI ViT-B/16 and ViT-L/14, quick-GELU.
    "vit_b16": dict(
        vision=dict(hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, patch_size=16,
                    image_size=224, hidden_act="quick_gelu"),
        text=dict(hidden_size=512, intermediate_size=2048,
                  num_hidden_layers=12, num_attention_heads=8,
                  hidden_act="quick_gelu"),
        projection_dim=512),
    "vit_l14": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                    image_size=224, hidden_act="quick_gelu"),
        text=dict(hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu"),
        projection_dim=768),
}
TEACHERS: tuple[str, ...] = tuple(_TEACHERS)


def _vision_config(name: str) -> dict[str, Any]:
  return dict(_TEACHERS[name]["vision"], num_channels=3, layer_norm_eps=1e-5,
              projection_dim=_TEACHERS[name]["projection_dim"])


def vit_g14_vision_config() -> dict[str, Any]:
  """HF `CLIPVisionConfig` fields of OpenCLIP ViT-g/14 (1408 wide, 40 deep)."""
  return _vision_config("vit_g14")


def vit_b16_vision_config() -> dict[str, Any]:
  """HF `CLIPVisionConfig` fields of OpenAI CLIP ViT-B/16."""
  return _vision_config("vit_b16")


def vit_l14_vision_config() -> dict[str, Any]:
  """HF `CLIPVisionConfig` fields of OpenAI CLIP ViT-L/14."""
  return _vision_config("vit_l14")


def clip_config(name: str) -> Any:
  """A full `transformers.CLIPConfig` for teacher `name` (no weights)."""
  import transformers  # pylint: disable=g-import-not-at-top
  if name not in _TEACHERS:
    raise ValueError(f"unknown teacher {name!r}; choose one of {TEACHERS}.")
  t = _TEACHERS[name]
  text = dict(t["text"], vocab_size=49408, max_position_embeddings=77,
              layer_norm_eps=1e-5, projection_dim=t["projection_dim"])
  return transformers.CLIPConfig(text_config=text,
                                 vision_config=_vision_config(name),
                                 projection_dim=t["projection_dim"])


def clip_image_tower_count(vision: dict[str, Any], projection_dim: int) -> int:
  """Closed-form parameter count of an HF CLIP image tower + projection.

  Patch conv (no bias), class token, positions, pre/post LayerNorm, per layer
  q/k/v/out (with bias), MLP (with bias), two LayerNorms; projection no bias.
  """
  w, m, n = vision["hidden_size"], vision["intermediate_size"], \
      vision["num_hidden_layers"]
  p, c = vision["patch_size"], vision.get("num_channels", 3)
  tokens = (vision["image_size"] // p) ** 2 + 1
  embed = c * p * p * w + w + tokens * w + 2 * w
  layer = 4 * (w * w + w) + (w * m + m) + (m * w + w) + 4 * w
  return embed + n * layer + 2 * w + w * projection_dim


def model_size(tree: Any) -> dict[str, int]:
  """{'params': number of elements, 'bytes': stored bytes} of a pytree.

  Works on arrays and `jax.ShapeDtypeStruct`s; int4 counts half a byte.
  """
  count, nbytes = 0, 0.0
  for leaf in jax.tree.leaves(nn.meta.unbox(tree)):
    size = int(np.prod(leaf.shape))
    count += size
    itemsize = 0.5 if leaf.dtype == jnp.int4 else jnp.dtype(leaf.dtype).itemsize
    nbytes += size * itemsize
  return {"params": count, "bytes": int(np.ceil(nbytes))}


def teacher_image_tower_size(hf_config: Any) -> dict[str, Any]:
  """Image tower (+ visual projection) of a CLIP teacher, from its config.

  Args:
    hf_config: `transformers.CLIPConfig` (e.g. `clip_config('vit_g14')`).

  Returns:
    {'params', 'bytes_fp32', 'analytic_params'}: `params` from
    `jax.eval_shape` of the Flax CLIP's `encode_image` init (the vision
    model, the projection; `logit_scale` excluded); `analytic_params` the
    closed form.
  """
  from edgevl_jax.models import clip  # pylint: disable=g-import-not-at-top
  model = clip.CLIP(hf_config)
  v = model.config.vision
  images = jax.ShapeDtypeStruct((1, v.image_size, v.image_size,
                                 v.num_channels), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, method="encode_image"),
      images)["params"]
  tower = {k: shapes[k] for k in ("vision_model", "visual_projection")}
  n = model_size(tower)["params"]
  d = hf_config.to_dict()
  return {"params": n, "bytes_fp32": 4 * n,
          "analytic_params": clip_image_tower_count(d["vision_config"],
                                                    d["projection_dim"])}


def student_size(name: str, *, embed_dim: int | None, spec: Any = None,
                 **overrides) -> dict[str, Any]:
  """fp32 and int8-served size of student `name` (no weights materialised).

  Args:
    name: a `students.NAMES` entry.
    embed_dim: D of the projection head.
    spec: a `quant.QuantSpec` for the served size (default static int8).
    **overrides: student overrides (tiny configs in tests); `image_size`
      (default 224) is also the traced input side.

  Returns:
    {'params', 'bytes_fp32', 'bytes_int8', 'quantised_weights',
    'float_params_int8'}: `params` counts trainable parameters (BatchNorm
    statistics excluded), bytes include BatchNorm statistics. `params` and
    `bytes_fp32` are the trained model's; a student with a `deploy` field
    (GhostNetV3) is served re-parameterised, so `bytes_int8` and
    `quantised_weights` are the folded model's.
  """
  from edgevl_jax.models import students  # pylint: disable=g-import-not-at-top
  spec = quant.int8("static") if spec is None else spec
  image_size = overrides.get("image_size", 224)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  rng = jax.random.PRNGKey(0)
  fp32 = jax.eval_shape(
      students.build(name, embed_dim=embed_dim, **overrides).init, rng, images)
  # A re-parameterisable student (GhostNetV3) is served folded.
  deploy = ({"deploy": True} if "deploy" in students.allowed_overrides(name)
            else {})
  serve_model = students.build(name, embed_dim=embed_dim,
                               quant=spec.replace(phase="serve"),
                               **{**deploy, **overrides})
  served = quant.flow.drop_frozen_kernels(
      jax.eval_shape(serve_model.init, rng, images))
  int_leaves = [l for l in jax.tree.leaves(served[quant.AQT_COLLECTION])
                if jnp.issubdtype(l.dtype, jnp.integer)]
  n_q = sum(int(np.prod(l.shape)) for l in int_leaves)
  # Sown collections (e.g. BatchNorm input moments) are not model state.
  keep = ("params", "batch_stats", quant.AQT_COLLECTION, quant.QUANT_STATS)
  fp32 = {k: v for k, v in fp32.items() if k in keep}
  served = {k: v for k, v in served.items() if k in keep}
  params = model_size(fp32["params"])["params"]
  return {
      "params": params,
      "bytes_fp32": model_size(fp32)["bytes"],
      "bytes_int8": model_size(served)["bytes"],
      "quantised_weights": n_q,
      # What stays float in the served tree (biases, norms, ...); equals
      # params - quantised_weights unless the served model is folded.
      "float_params_int8": model_size(served["params"])["params"],
  }


def size_report(
    *,
    teacher: str = "vit_g14",
    students_: Sequence[str] = ("vit_ti16", "vit_s16", "vit_b16", "swin_t",
                                "resnet18", "mobilenet_v2", "ghostnetv3_100"),
    embed_dim: int | None = None,
) -> dict[str, Any]:
  """Teacher fp32 image tower vs each student fp32 and int8.

  Args:
    teacher: a `TEACHERS` entry.
    students_: student names.
    embed_dim: projection size D (default: the teacher's projection_dim).

  Returns:
    {'teacher': {...}, 'students': {name: {... 'ratio_fp32', 'ratio_int8'}}}
    with ratio = teacher fp32 bytes / student bytes.
  """
  t = teacher_image_tower_size(clip_config(teacher))
  t["name"] = teacher
  d = embed_dim or _TEACHERS[teacher]["projection_dim"]
  out = {"teacher": t, "embed_dim": d, "students": {}}
  for name in students_:
    s = student_size(name, embed_dim=d)
    s["ratio_fp32"] = t["bytes_fp32"] / s["bytes_fp32"]
    s["ratio_int8"] = t["bytes_fp32"] / s["bytes_int8"]
    out["students"][name] = s
  return out
