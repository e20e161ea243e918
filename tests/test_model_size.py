"""Model sizes from configs alone, checked against HF meta-device counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from edgevl_jax import quant
from edgevl_jax.export import size

students = pytest.importorskip("edgevl_jax.models.students")


def _torch_count(model_fn):
  with torch.device("meta"):
    model = model_fn()
  return sum(p.numel() for p in model.parameters())


def _clip_vision_torch(vision):
  return _torch_count(lambda: transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**vision)))


@pytest.mark.slow
def test_vit_g14_image_tower_is_1p01b_params_4p05gb():
  cfg = size.clip_config("vit_g14")
  t = size.teacher_image_tower_size(cfg)
  assert t["params"] == t["analytic_params"]
  assert t["params"] == _clip_vision_torch(size.vit_g14_vision_config())
  assert 1.00e9 < t["params"] < 1.02e9
  assert 4.03e9 < t["bytes_fp32"] < 4.07e9


def test_vit_b16_image_tower_flax_analytic_torch_agree():
  t = size.teacher_image_tower_size(size.clip_config("vit_b16"))
  vision = size.vit_b16_vision_config()
  assert t["params"] == t["analytic_params"] == _clip_vision_torch(vision)
  projection = 768 * 512
  assert 85.5e6 < t["params"] - projection < 86.5e6  # ViT-B/16 ~86 M


def test_vit_l14_analytic_matches_torch():
  vision = size.vit_l14_vision_config()
  n = size.clip_image_tower_count(vision, vision["projection_dim"])
  assert n == _clip_vision_torch(vision)
  assert 303e6 < n < 305e6


@pytest.mark.parametrize("name,hf_model", [
    ("swin_t", lambda: transformers.SwinModel(transformers.SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
        window_size=7, image_size=224))),
    ("resnet18", lambda: transformers.ResNetModel(transformers.ResNetConfig(
        depths=[2, 2, 2, 2], layer_type="basic",
        hidden_sizes=[64, 128, 256, 512]))),
    ("vit_ti16", lambda: transformers.ViTModel(transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
        intermediate_size=768), add_pooling_layer=False)),
])
def test_student_backbone_counts_match_hf(name, hf_model):
  model = students.build(name, embed_dim=None)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert size.model_size(shapes["params"])["params"] == _torch_count(hf_model)


def test_swin_t_int8_is_about_140x_smaller_than_vit_g14():
  s = size.student_size("swin_t", embed_dim=1024)
  assert 28.0e6 < s["params"] < 28.6e6  # Swin-T ~28 M + 768->1024 head
  # int8: ~1 byte per weight, the rest fp32.
  assert s["quantised_weights"] > 0.99 * s["params"]
  assert s["bytes_int8"] >= s["quantised_weights"] + 4 * s["float_params_int8"]
  assert s["bytes_int8"] < 1.03 * s["params"]
  assert 3.9 < s["bytes_fp32"] / s["bytes_int8"] < 4.0
  vision = size.vit_g14_vision_config()
  teacher_bytes = 4 * size.clip_image_tower_count(vision, 1024)
  assert 135 < teacher_bytes / s["bytes_int8"] < 145


_TINY = {
    "vit_ti16": dict(image_size=32, patch_size=8, depth=2, width=32,
                     num_heads=2),
    "resnet18": dict(image_size=32, widths=(8, 16, 16, 16), stem_width=8),
}


@pytest.mark.parametrize("name", sorted(_TINY))
def test_served_student_matches_fake_quant_and_abstract_size(name):
  spec, kw = quant.int8("static"), _TINY[name]
  model = students.build(name, embed_dim=16, **kw)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  variables = {k: v for k, v in variables.items()
               if k in ("params", "batch_stats")}
  build = lambda phase: students.build(
      name, embed_dim=16, quant=spec.replace(phase=phase), **kw)
  variables = quant.calibrate(build("calibrate").apply, variables, [x])
  served = quant.convert(build("convert").apply, variables, x)
  out = jax.jit(lambda v, x: quant.serve_apply(build("serve").apply, v, x))(
      served, x)
  fake = jax.jit(build("train").apply)(variables, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(fake), rtol=1e-4,
                             atol=1e-4)
  predicted = size.student_size(name, embed_dim=16, spec=spec, **kw)
  assert predicted["bytes_int8"] == quant.served_nbytes(served)["total"]
  if name == "vit_ti16":  # patch conv + 4 dense per block + head
    assert predicted["quantised_weights"] == (
        3 * 8 * 8 * 32 + 2 * (4 * 32 * 32 + 2 * 32 * 128) + 32 * 16)


def test_int4_counts_half_a_byte():
  tree = {"w": jax.ShapeDtypeStruct((10, 7), jnp.int4),
          "b": jax.ShapeDtypeStruct((7,), jnp.float32),
          "q": np.zeros((3,), np.int8)}
  assert size.model_size(tree) == {"params": 80, "bytes": 35 + 28 + 3}


def test_unknown_teacher_names_the_choices():
  with pytest.raises(ValueError, match="vit_g14"):
    size.clip_config("vit_h14")


@pytest.mark.parametrize("name,kw", [
    ("vit_ti16", dict(image_size=32, patch_size=8, depth=2, width=32,
                      num_heads=2)),
    ("swin_t", dict(width=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))),
    ("resnet18", dict(image_size=32, widths=(8, 16, 16, 16), stem_width=8)),
])
def test_int8_student_params_tree_equals_fp32_tree(name, kw):
  """Stage 2 starts from stage-1 params: same paths, shapes, dtypes."""
  side = kw.get("image_size", 224)
  x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  trees = {}
  for label, spec in (("fp32", None), ("int8", quant.int8()),
                      ("static", quant.int8("static"))):
    model = students.build(name, embed_dim=16, quant=spec, **kw)
    trees[label] = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  fp32 = trees["fp32"]["params"]
  for label in ("int8", "static"):
    assert (jax.tree.map(lambda a: (a.shape, a.dtype), trees[label]["params"])
            == jax.tree.map(lambda a: (a.shape, a.dtype), fp32)), label
  assert set(trees["int8"]) == set(trees["fp32"])
  assert set(trees["static"]) == set(trees["fp32"]) | {quant.QUANT_STATS}
