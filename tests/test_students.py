"""Student builders: shapes, parameter counts, ops injection, train-mode
behaviour (drop-path, BatchNorm statistics) and input validation.

Shapes and counts use `jax.eval_shape` (no compilation), so every builder
name is checked at full size too; numeric tests use tiny models whose
parameters are filled from numpy instead of compiled initialisers.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgevl_jax.models import layers
from edgevl_jax.models import students

KEY = jax.random.key(0)

# name -> (tiny overrides, image side, expected stage shapes without batch,
# pooled width).
TINY = {
    "vit_ti16": (dict(image_size=32, patch_size=8, depth=2), 32,
                 [(17, 192)] * 4, 192),
    "vit_s16": (dict(image_size=32, patch_size=8, depth=2), 32,
                [(17, 384)] * 4, 384),
    "vit_b16": (dict(image_size=32, patch_size=8, depth=2), 32,
                [(17, 768)] * 4, 768),
    "swin_t": (dict(image_size=64, window_size=4), 64,
               [(16, 16, 96), (8, 8, 192), (4, 4, 384), (2, 2, 768)], 768),
    # The 18-block third stage is counted at full size below.
    "swin_t_edgevl": (dict(image_size=64, window_size=4, depths=(2, 2, 2, 2)),
                      64,
                      [(16, 16, 96), (8, 8, 192), (4, 4, 384), (2, 2, 768)],
                      768),
    "swin_s": (dict(image_size=64, window_size=4, depths=(2, 2, 2, 2)), 64,
               [(16, 16, 96), (8, 8, 192), (4, 4, 384), (2, 2, 768)], 768),
    # 16 px with stem stride 1 (patch_size 2): every 'D' block keeps 2x2
    # reference points.
    "dat_t": (dict(image_size=16, patch_size=2, dim_stem=16,
                   dims=(16, 32, 32, 32), depths=(1, 1, 1, 1),
                   stage_spec=("N", "D", "N", "D"), num_heads=(2, 4, 4, 4),
                   groups=(1, 2, 2, 2), nat_kernels=(5, 5, 5, 5)), 16,
              [(16, 16, 16), (8, 8, 32), (4, 4, 32), (2, 2, 32)], 32),
    "resnet18": (dict(image_size=32, cifar_stem=True), 32,
                 [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)], 512),
    "resnet34": (dict(image_size=64), 64,
                 [(16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512)], 512),
    "mobilenet_v2": (dict(image_size=64), 64,
                     [(16, 16, 24), (8, 8, 32), (4, 4, 96), (2, 2, 320)],
                     1280),
    # The DFC attention needs the stride-32 map to be at least 2x2.
    "ghostnetv3_100": (dict(image_size=64), 64,
                       [(16, 16, 24), (8, 8, 40), (4, 4, 112), (2, 2, 160)],
                       1280),
}

# Backbone parameters at full size (no head), as counted by the Hugging Face
# PyTorch models of the same configs (ViTModel without pooler, SwinModel,
# ResNetModel, MobileNetV2Model) and BatchNorm running stats excluded.
FULL_PARAMS = {
    "vit_ti16": 5_524_416, "vit_s16": 21_665_664, "vit_b16": 85_798_656,
    "swin_t": 27_519_354, "swin_t_edgevl": 48_837_258, "swin_s": 48_837_258,
    "resnet18": 11_176_512,
    "resnet34": 21_284_672, "mobilenet_v2": 2_223_872,
    # timm ghostnetv3_100 without its classifier (8_129_028 - 1_281_000).
    "ghostnetv3_100": 6_848_028,
}


def _abstract(model, side, batch=2):
  x = jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32)
  return jax.eval_shape(model.init, KEY, x), x


def _numpy_variables(model, side, seed=0):
  """Variables with the init structure (boxes included), numpy-filled."""
  abstract, _ = _abstract(model, side)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "var'" in name or "scale'" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)

  return {c: jax.tree_util.tree_map_with_path(fill, v)
          for c, v in abstract.items() if c in ("params", "batch_stats")}


def _images(side, batch=2, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(
      size=(batch, side, side, 3)), jnp.float32)


@pytest.mark.parametrize("name", students.NAMES)
def test_builder_output_and_stage_shapes(name):
  overrides, side, stages, width = TINY[name]
  model = students.build(name, embed_dim=24, **overrides)
  variables, x = _abstract(model, side)
  emb = jax.eval_shape(model.apply, variables, x)
  assert emb.shape == (2, 24)
  feats = jax.eval_shape(
      lambda v, x: model.apply(v, x, method="features"), variables, x)
  assert feats["pooled"].shape == (2, width)
  assert [s.shape[1:] for s in feats["stages"]] == stages
  head = variables["params"]["head"]
  assert ("norm" in head) == name.startswith(("swin", "dat", "ghostnet"))


@pytest.mark.parametrize("name", sorted(FULL_PARAMS))
def test_full_size_parameter_counts(name):
  model = students.build(name, embed_dim=None)
  variables, _ = _abstract(model, 224, batch=1)
  count = sum(p.size for p in jax.tree.leaves(variables["params"]))
  assert count == FULL_PARAMS[name]


def test_swin_variants_follow_the_spec():
  def field(name, key):
    return getattr(students.build(name, embed_dim=8).backbone, key)
  assert tuple(field("swin_t", "depths")) == (2, 2, 6, 2)
  assert tuple(field("swin_t_edgevl", "depths")) == (2, 2, 18, 2)
  assert field("swin_t_edgevl", "drop_path_rate") == 0.3
  assert field("swin_t", "drop_path_rate") == 0.2
  assert field("swin_t", "width") == 96 and field("swin_t", "window_size") == 7
  assert tuple(field("swin_s", "num_heads")) == (3, 6, 12, 24)


def test_stage_rule_for_shallow_and_deep_transformers():
  from edgevl_jax.models.vit import stage_blocks
  assert stage_blocks(12) == (1, 3, 9, 11)
  assert stage_blocks(24) == (3, 7, 19, 23)
  assert stage_blocks(2) == (0, 0, 1, 1)


@pytest.mark.parametrize("name", ["vit_ti16", "swin_t", "resnet18",
                                  "mobilenet_v2", "ghostnetv3_100"])
def test_every_kernel_goes_through_injected_ops(name):
  counts = {"dot": 0, "conv": 0, "einsum": 0}

  def counting(kind, op):
    def factory():
      counts[kind] += 1
      return op
    return factory

  class Einsum(layers.PlainEinsum):
    def __call__(self, eqn, lhs, rhs):
      counts["einsum"] += 1
      return super().__call__(eqn, lhs, rhs)

  class Quant:
    def ops(self):
      return layers.Ops(
          dot_general_cls=counting("dot", jax.lax.dot_general),
          einsum_cls=Einsum,
          conv_general_dilated_cls=counting("conv",
                                            jax.lax.conv_general_dilated))

  overrides, side, _, _ = TINY[name]
  model = students.build(name, embed_dim=8, quant=Quant(), **overrides)
  variables, x = _abstract(model, side)
  for k in counts:
    counts[k] = 0
  jax.eval_shape(model.apply, variables, x)
  kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(
      nn.meta.unbox(variables["params"])) if "kernel" in str(path[-1])]
  assert counts["dot"] == sum(k.ndim == 2 for k in kernels)
  # Swin's patch embedding stays float unless asked (the reference's int8
  # Swin); ViT's is quantised.
  float_convs = 1 if name.startswith("swin") else 0
  assert counts["conv"] == sum(k.ndim == 4 for k in kernels) - float_convs
  attention_blocks = (2 if name.startswith("vit") else
                      sum(model.backbone.depths) if name.startswith("swin")
                      else 0)
  assert counts["einsum"] == 2 * attention_blocks
  if name.startswith("swin"):
    model = students.build(name, embed_dim=8, quant=Quant(),
                           quantize_patch_embed=True, **overrides)
    counts["conv"] = 0
    jax.eval_shape(model.apply, variables, x)
    assert counts["conv"] == sum(k.ndim == 4 for k in kernels)


@pytest.mark.parametrize("name", ["vit_b16", "swin_t", "resnet18",
                                  "mobilenet_v2"])
def test_params_have_logical_axes_without_mesh_axis_reuse(name):
  overrides, side, _, _ = TINY[name]
  variables, _ = _abstract(students.build(name, embed_dim=8, **overrides),
                           side)
  boxes = jax.tree.leaves(variables["params"],
                          is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert boxes and all(isinstance(b, nn.Partitioned) for b in boxes)
  for box in boxes:
    assert len(box.names) == box.value.ndim
    mesh_axes = nn.logical_to_mesh_axes(box.names, layers.LOGICAL_AXIS_RULES)
    used = [a for a in mesh_axes if a is not None]
    assert len(used) == len(set(used))


def test_drop_path_only_in_train_mode_with_dropout_rng():
  model = students.build("vit_ti16", embed_dim=8, image_size=16,
                         patch_size=8, depth=2, width=16, num_heads=2,
                         drop_path_rate=0.5)
  variables = _numpy_variables(model, 16)
  x = _images(16, batch=8)
  apply = jax.jit(model.apply, static_argnames="train")
  eval_out = apply(variables, x, train=False)
  np.testing.assert_array_equal(eval_out, apply(variables, x, train=False))
  a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert float(jnp.max(jnp.abs(a - eval_out))) > 1e-3
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True)


def test_batchnorm_uses_and_updates_batch_statistics_in_train_mode():
  model = students.build("resnet18", embed_dim=8, image_size=16,
                         cifar_stem=True, stage_sizes=(1, 1, 1, 1),
                         widths=(4, 4, 8, 8), stem_width=4)
  variables = _numpy_variables(model, 16)
  x = _images(16, batch=4)
  out, updates = model.apply(variables, x, train=True,
                             mutable=["batch_stats", "bn_stats"])
  old = variables["batch_stats"]["backbone"]["stem_bn"]["bn"]
  new = updates["batch_stats"]["backbone"]["stem_bn"]["bn"]
  mean, var = updates["bn_stats"]["backbone"]["stem_bn"]["input_moments"][0]
  # Flax keeps the biased batch variance in its running average.
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var,
                             rtol=1e-4, atol=1e-6)
  # Batch statistics, not running ones, normalise the training forward.
  assert float(jnp.max(jnp.abs(out - model.apply(variables, x)))) > 1e-3
  with pytest.raises(Exception, match="batch_stats"):
    model.apply(variables, x, train=True)


@pytest.mark.parametrize("name,shape,match", [
    ("vit_ti16", (2, 32, 32, 1), r"NHWC RGB .*\(2, 32, 32, 1\)"),
    ("vit_ti16", (2, 3, 32, 32), r"NHWC RGB .*channels last"),
    ("vit_ti16", (2, 48, 48, 3), r"\(B, 32, 32, 3\), got \(2, 48, 48, 3\)"),
    ("swin_t", (2, 66, 64, 3), r"multiples of 4"),
    ("resnet18", (32, 32, 3), r"NHWC RGB .*got \(32, 32, 3\)"),
    ("mobilenet_v2", (2, 32, 32, 4), r"NHWC RGB"),
])
def test_bad_input_is_named(name, shape, match):
  overrides, side, _, _ = TINY[name]
  model = students.build(name, embed_dim=8, **overrides)
  variables, _ = _abstract(model, side)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.apply, variables,
                   jax.ShapeDtypeStruct(shape, jnp.float32))


def test_bad_builder_arguments_are_named():
  with pytest.raises(ValueError, match=r"unknown override\(s\) \['depht'\] "
                     r"for student 'vit_s16'; allowed: .*'depth'"):
    students.build("vit_s16", embed_dim=8, depht=2)
  with pytest.raises(ValueError, match=r"unknown student 'vit_h14'"):
    students.build("vit_h14", embed_dim=8)
  with pytest.raises(ValueError, match="embed_dim"):
    students.build("resnet18", embed_dim=0)


def test_int8_quantised_student_runs_close_to_float():
  quant = pytest.importorskip("edgevl_jax.quant")
  kw = dict(image_size=16, patch_size=8, depth=1, width=16, num_heads=2,
            drop_path_rate=0.0)
  fp = students.build("vit_ti16", embed_dim=8, **kw)
  q = students.build("vit_ti16", embed_dim=8, quant=quant.int8(), **kw)
  variables = _numpy_variables(fp, 16)
  x = _images(16)
  ref = fp.apply(variables, x)
  out = jax.jit(q.apply)(variables, x)
  err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert out.shape == (2, 8)
  assert 0.0 < err < 0.1


@pytest.mark.parametrize("name", ["vit_ti16", "swin_t", "resnet18",
                                  "mobilenet_v2"])
def test_bfloat16_compute_keeps_float32_params(name):
  overrides, side, _, _ = TINY[name]
  model = students.build(name, embed_dim=8, dtype=jnp.bfloat16, **overrides)
  variables, x = _abstract(model, side)
  assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {
      jnp.dtype(jnp.float32)}
  feats = jax.eval_shape(
      lambda v, x: model.apply(v, x, method="features"), variables, x)
  assert jax.eval_shape(model.apply, variables, x).dtype == jnp.bfloat16
  assert all(s.dtype == jnp.bfloat16 for s in feats["stages"])
