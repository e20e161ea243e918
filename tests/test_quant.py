"""AQT int8 QAT: paper numerics, STE, static calibration, int8 serving."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgevl_jax import quant
from edgevl_jax.models import layers


def paper_fake_quant(x, amax, bits=8):
  """The paper's formula in float64 numpy: scale = qmax / amax."""
  qmax = 2 ** (bits - 1) - 1
  scale = qmax / amax
  q = np.clip(np.round(x * scale), -qmax - 1, qmax)
  return q / scale


class TinyDense(nn.Module):
  spec: quant.QuantSpec | None = None

  @nn.compact
  def __call__(self, x):
    ops = self.spec.ops() if self.spec else layers.Ops()
    return layers.dense(6, ops=ops, axes=(layers.EMBED, layers.MLP),
                        name="fc")(x)


class TinyAttention(nn.Module):
  spec: quant.QuantSpec | None = None

  @nn.compact
  def __call__(self, q, k):
    ops = self.spec.ops() if self.spec else layers.Ops()
    return layers.einsum(ops=ops, name="qk")("bqhd,bkhd->bhqk", q, k)


class TinyViT(nn.Module):
  """Patch conv + qkv dense + both attention einsums + proj + head."""
  spec: quant.QuantSpec | None = None

  @nn.compact
  def __call__(self, images):
    ops = self.spec.ops() if self.spec else layers.Ops()
    x = layers.conv(16, (4, 4), strides=4, padding="VALID", ops=ops,
                    name="patch")(images)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    qkv = layers.dense(3 * c, ops=ops, axes=(layers.EMBED, layers.HEADS),
                       name="qkv")(x)
    q, k, v = [t[:, :, 0] for t in
               jnp.split(qkv.reshape(b, h * w, 3, 2, c // 2), 3, axis=2)]
    att = layers.einsum(ops=ops, name="qk")("bqhd,bkhd->bhqk", q, k)
    att = jax.nn.softmax(att / np.sqrt(c // 2), axis=-1)
    o = layers.einsum(ops=ops, name="av")("bhqk,bkhd->bqhd", att, v)
    x = x + layers.dense(c, ops=ops, axes=(layers.HEADS, layers.EMBED),
                         name="proj")(o.reshape(b, h * w, c))
    return layers.dense(8, ops=ops, axes=(layers.EMBED, layers.CLASSES),
                        name="head")(x.mean(axis=1))


def _images(seed, scale=1.0, n=4):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 16, 16, 3)) * scale


@pytest.fixture(scope="module")
def vit_params():
  return TinyViT().init(jax.random.PRNGKey(0), _images(0))


def test_dense_forward_matches_paper_formula():
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 5, 12)))
  variables = TinyDense().init(jax.random.PRNGKey(0), x)
  w = np.asarray(nn.meta.unbox(variables)["params"]["fc"]["kernel"], np.float64)
  b = np.asarray(nn.meta.unbox(variables)["params"]["fc"]["bias"], np.float64)
  y = TinyDense(quant.int8()).apply(variables, x)  # no rngs needed
  x64 = x.astype(np.float64)
  w_hat = paper_fake_quant(w, np.abs(w).max(axis=0, keepdims=True))
  ref = paper_fake_quant(x64, np.abs(x64).max()) @ w_hat + b
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  # ... and it is not the float result.
  assert np.abs(x64 @ w + b - ref).max() > 1e-3


def test_int4_weights_match_paper_formula():
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (3, 12)))
  variables = TinyDense().init(jax.random.PRNGKey(0), x)
  w = np.asarray(nn.meta.unbox(variables)["params"]["fc"]["kernel"], np.float64)
  b = np.asarray(nn.meta.unbox(variables)["params"]["fc"]["bias"], np.float64)
  y = TinyDense(quant.int4_weights()).apply(variables, x)
  w_hat = paper_fake_quant(w, np.abs(w).max(axis=0, keepdims=True), bits=4)
  x_hat = paper_fake_quant(x.astype(np.float64), np.abs(x).max())
  np.testing.assert_allclose(np.asarray(y), x_hat @ w_hat + b, rtol=1e-5,
                             atol=1e-5)


def test_attention_einsum_matches_paper_formula():
  kq, kk = jax.random.split(jax.random.PRNGKey(3))
  q = np.asarray(jax.random.normal(kq, (2, 7, 3, 8)))
  k = np.asarray(jax.random.normal(kk, (2, 9, 3, 8))) * 3.0
  y = TinyAttention(quant.int8()).apply({}, q, k)
  q_hat = paper_fake_quant(q.astype(np.float64), np.abs(q).max())
  k_hat = paper_fake_quant(k.astype(np.float64), np.abs(k).max())
  ref = np.einsum("bqhd,bkhd->bhqk", q_hat, k_hat)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  assert np.abs(np.einsum("bqhd,bkhd->bhqk", q, k) - ref).max() > 1e-3


def test_ste_gradient_zero_outside_static_range():
  spec = quant.int8("static")
  calib_x = jnp.array([[1.0, -0.5, 0.25, 0.0]])  # amax = 1
  variables = TinyDense().init(jax.random.PRNGKey(0), calib_x)
  variables = quant.calibrate(TinyDense(spec.replace(phase="calibrate")).apply,
                              variables, [calib_x], jit=False)
  amax = variables[quant.QUANT_STATS]["fc"]["AqtDotGeneral_0"][
      "RunningAbsMaxCalibration_0"]["amax"]
  np.testing.assert_allclose(np.asarray(amax).ravel(), [1.0])
  x = jnp.array([[0.5, -0.9, 1.5, -3.0], [1.0, -1.0, 0.0, 2.0]])
  grad = jax.grad(lambda x: TinyDense(spec).apply(variables, x).sum())(x)
  w = np.asarray(nn.meta.unbox(variables)["params"]["fc"]["kernel"],
                 np.float64)
  w_hat = paper_fake_quant(w, np.abs(w).max(axis=0, keepdims=True))
  inside = np.abs(np.asarray(x)) <= 1.0
  expected = inside * w_hat.sum(axis=1)[None, :]
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-6)
  assert not inside.all() and inside.any()


def test_conv_ste_gradient_is_identity_inside_zero_outside():
  x = jnp.array([-2.0, -1.0, -0.3, 0.0, 0.7, 1.0, 1.01, 5.0])
  step = quant.numerics.quant_step(jnp.array(1.0), 8)
  grad = jax.grad(lambda x: (quant.numerics.ste_quantize(x, step, 8)
                             * step).sum())(x)
  np.testing.assert_allclose(np.asarray(grad),
                             (np.abs(np.asarray(x)) <= 1.0).astype(np.float32))
  q = quant.numerics.ste_quantize(x, step, 8)
  np.testing.assert_array_equal(np.asarray(q), [-127, -127, -38, 0, 89, 127,
                                                127, 127])


def test_static_calibration_is_running_max_over_batches(vit_params):
  spec = quant.int8("static", phase="calibrate")
  apply_fn = TinyViT(spec).apply
  b1, b2 = _images(1, 1.0), _images(2, 3.0)
  calibrate = functools.partial(quant.calibrate, apply_fn, jit=False)
  stats = calibrate(vit_params, [b1, b2])[quant.QUANT_STATS]
  patch_amax = stats["patch"]["QuantConvGeneralDilated_0"]["lhs_calibration"]
  expected = max(np.abs(np.asarray(b1)).max(), np.abs(np.asarray(b2)).max())
  np.testing.assert_allclose(np.asarray(patch_amax["amax"]).ravel(),
                             [expected], rtol=1e-6)
  # Order does not matter, and calibrating in two calls continues the max.
  rev = calibrate(vit_params, [b2, b1])[quant.QUANT_STATS]
  cont = calibrate(calibrate(vit_params, [b1]), [b2])[quant.QUANT_STATS]
  for other in (rev, cont):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 stats, other)
  # Every quantised activation got a range: 4 dense/conv inputs + 2x2 einsum.
  assert len(jax.tree.leaves(stats)) == 8
  # Attention probabilities are in [0, 1].
  av = stats["av"]["AqtDotGeneral_0"]
  assert 0.0 < min(float(np.max(l)) for l in jax.tree.leaves(av)) <= 1.0


def test_static_model_without_ranges_names_the_fix(vit_params):
  with pytest.raises(ValueError, match="quant.calibrate"):
    TinyViT(quant.int8("static")).apply(vit_params, _images(0))


@pytest.mark.parametrize("name,spec,int_dtype", [
    ("int8_dynamic", quant.int8(), jnp.int8),
    ("int8_static", quant.int8("static"), jnp.int8),
    ("int4_weights", quant.int4_weights(), jnp.int4),
    ("int8_weight_only", quant.int8_weight_only(), jnp.int8),
])
def test_served_int_model_equals_fake_quant(vit_params, name, spec, int_dtype):
  variables = vit_params
  if spec.calibration == "static":
    variables = quant.calibrate(
        TinyViT(spec.replace(phase="calibrate")).apply, variables,
        [_images(5), _images(6, 2.0)], jit=False)
  x = _images(7)
  fake = TinyViT(spec).apply(variables, x)
  served = quant.convert(TinyViT(spec.replace(phase="convert")).apply,
                         variables, x)
  serve = jax.jit(lambda v, x: quant.serve_apply(
      TinyViT(spec.replace(phase="serve")).apply, v, x))
  out = serve(served, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(fake), rtol=1e-5,
                             atol=1e-5, err_msg=name)
  fp32 = TinyViT().apply(vit_params, x)
  assert np.abs(np.asarray(fp32) - np.asarray(fake)).max() > 1e-4
  # Float kernels are gone; int codes carry the kernel shapes.
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(served["params"]))
  assert not [p for p in flat if p[-1] == "kernel"], name
  values = [v for p, v in flax.traverse_util.flatten_dict(
      served[quant.AQT_COLLECTION]).items() if p[-1].endswith("value")]
  assert len(values) == 4 and all(v.dtype == int_dtype for v in values)
  qmax = 127 if int_dtype == jnp.int8 else 7
  assert max(int(jnp.max(jnp.abs(v.astype(jnp.int32)))) for v in values) == qmax


def test_served_bytes_about_one_per_weight():
  x = jnp.ones((2, 256))
  model = lambda spec=None: nn.Dense(512, dot_general_cls=(
      spec.ops().dot_general_cls if spec else None))
  variables = model().init(jax.random.PRNGKey(0), x)
  spec = quant.int8()
  served = quant.convert(model(spec.replace(phase="convert")).apply,
                         variables, x)
  sizes = quant.served_nbytes(served)
  n_weights = 256 * 512
  assert sizes["int_weight_elems"] == n_weights
  assert sizes["int_weights"] == n_weights  # 1 byte each
  assert sizes["scales"] == 512 * 4 and sizes["float_params"] == 512 * 4
  # Serialised: 1 byte per weight + fp32 scales/bias + small overhead.
  assert n_weights + 4096 <= sizes["msgpack"] < 1.02 * (n_weights + 4096)
  fp32 = len(flax.serialization.msgpack_serialize(
      jax.tree.map(np.asarray, variables)))
  assert 3.8 < fp32 / sizes["msgpack"] < 4.0


@pytest.mark.parametrize("spec", [quant.int8(), quant.int4_weights(),
                                  quant.int8_weight_only(),
                                  quant.int8("static")])
def test_params_tree_equals_fp32_tree(vit_params, spec):
  qvars = TinyViT(spec).init(jax.random.PRNGKey(0), _images(0))
  fp32 = jax.tree.map(lambda a: a.shape, nn.meta.unbox(vit_params["params"]))
  q = jax.tree.map(lambda a: a.shape, nn.meta.unbox(qvars["params"]))
  assert q == fp32
  extra = set(qvars) - {"params"}
  assert extra == ({quant.QUANT_STATS} if spec.calibration == "static"
                   else set())


def test_quant_spec_is_hashable_and_validates():
  spec = quant.int8()
  assert hash(spec) == hash(quant.QuantSpec())
  assert spec.replace(phase="serve").phase == "serve"
  assert spec.replace(phase="serve") != spec
  with pytest.raises(ValueError, match="weight_bits"):
    quant.QuantSpec(weight_bits=3)
  with pytest.raises(ValueError, match="phase"):
    spec.replace(phase="export")
  with pytest.raises(ValueError, match="calibration"):
    quant.int8("minmax")


def test_convert_without_convert_phase_names_the_fix(vit_params):
  with pytest.raises(ValueError, match="phase='convert'"):
    quant.convert(TinyViT(quant.int8()).apply, vit_params, _images(0))


def test_qat_gradients_flow_to_every_kernel(vit_params):
  x, target = _images(8), jnp.ones((4, 8))

  def loss(params, spec):
    out = TinyViT(spec).apply({"params": params}, x)
    return jnp.abs(out - target).mean()

  params = nn.meta.unbox(vit_params)["params"]
  g_q = jax.jit(jax.grad(loss), static_argnums=1)(params, quant.int8())
  g_f = jax.jit(jax.grad(loss), static_argnums=1)(params, None)
  for path, g in flax.traverse_util.flatten_dict(g_q).items():
    assert np.isfinite(np.asarray(g)).all(), path
    if path[-1] == "kernel":
      gf = np.asarray(flax.traverse_util.flatten_dict(g_f)[path]).ravel()
      gq = np.asarray(g).ravel()
      assert np.abs(gq).max() > 0.0, path
      cos = gq @ gf / (np.linalg.norm(gq) * np.linalg.norm(gf))
      assert cos > 0.9, (path, cos)


def _float_input_ranges(variables, images):
  """max |x| of every array argument of every quantised op of the fp32
  TinyViT, by module name (the reference's float calibration)."""
  ranges = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      arrays = [a for a in args if isinstance(a, jax.Array)]
      if context.module.name in ("patch", "qkv", "qk", "av", "proj", "head"):
        ranges.setdefault(context.module.name, []).extend(
            float(jnp.abs(a).max()) for a in arrays)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    TinyViT().apply(variables, images)
  return ranges


@pytest.mark.parametrize("float_calibration", [True, False])
def test_float_calibration_measures_the_float_forward_pass(
    vit_params, float_calibration):
  """Default (reference protocol): ranges are those of the fp32 model; the
  fake-quant calibration sees quantised inputs downstream and differs."""
  images = _images(5, 2.0)
  spec = quant.int8("static", phase="calibrate")
  assert spec.float_calibration  # the default
  spec = spec.replace(float_calibration=float_calibration)
  stats = quant.calibrate(TinyViT(spec).apply, vit_params,
                          [images])[quant.QUANT_STATS]
  expected = _float_input_ranges(vit_params, images)
  worst = 0.0
  for name, maxima in expected.items():
    got = sorted(float(np.max(l)) for l in jax.tree.leaves(stats[name]))
    assert len(got) == len(maxima), name
    rel = np.abs(np.array(got) - np.array(sorted(maxima))) / np.array(got)
    worst = max(worst, float(rel.max()))
  if float_calibration:
    assert worst < 1e-5, worst
  else:
    assert worst > 1e-4, worst  # the quantised forward shifts the ranges
  # The patch embedding sees the raw images in both modes.
  patch = stats["patch"]["QuantConvGeneralDilated_0"]["lhs_calibration"]
  np.testing.assert_allclose(np.asarray(patch["amax"]).ravel(),
                             [np.abs(np.asarray(images)).max()], rtol=1e-6)
