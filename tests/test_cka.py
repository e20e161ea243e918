"""CKA maths: parity with a float64 numpy reference, invariances, minibatch
convergence, sharded accumulator == unsharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from edgevl_jax.analysis import cka as cka_lib


# ----- independent float64 reference (explicit H and Song et al. formula) ---
def _ref_gram(x, kernel, theta=1.0):
  x = x.reshape(x.shape[0], -1).astype(np.float64)
  if kernel == "linear":
    return x @ x.T
  d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
  return np.exp(-d2 / (2 * theta**2 * np.median(d2)))


def _ref_hsic(k, l, unbiased):
  n = k.shape[0]
  if not unbiased:
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2
  kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
  one = np.ones(n)
  # tr(K~ L~) and 1^T K~ L~ 1 as O(n^2) sums (K~, L~ symmetric).
  return (np.sum(kt * lt) + (one @ kt @ one) * (one @ lt @ one)
          / ((n - 1) * (n - 2)) - 2 / (n - 2) * (kt @ one) @ (lt @ one)) / (
              n * (n - 3))


def _ref_cka(x, y, kernel="linear", unbiased=False, theta=1.0):
  k, l = _ref_gram(x, kernel, theta), _ref_gram(y, kernel, theta)
  return _ref_hsic(k, l, unbiased) / np.sqrt(
      _ref_hsic(k, k, unbiased) * _ref_hsic(l, l, unbiased))


def _pair(n, p1, p2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, p1)).astype(np.float32) + 3.0  # non-zero means
  mix = rng.normal(size=(p1, p2)).astype(np.float32)
  y = np.tanh(x @ mix / np.sqrt(p1)) + 0.5 * rng.normal(size=(n, p2))
  return x, y.astype(np.float32)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("n,p1,p2", [(40, 7, 5), (12, 30, 50)])
def test_matches_float64_reference(kernel, unbiased, n, p1, p2):
  x, y = _pair(n, p1, p2)
  theta = 0.5 if kernel == "rbf" else None
  got = cka_lib.cka(x, y, kernel=kernel, unbiased=unbiased, sigma=theta)
  want = _ref_cka(x, y, kernel, unbiased, theta or 1.0)
  np.testing.assert_allclose(float(got), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("unbiased", [False, True])
def test_feature_space_equals_gram_form(unbiased):
  x, y = _pair(64, 9, 6, seed=1)  # p < n picks the feature-space path
  feat = cka_lib.cka(x, y, unbiased=unbiased)
  gram = cka_lib.cka_from_grams(cka_lib.gram_linear(jnp.asarray(x)),
                                cka_lib.gram_linear(jnp.asarray(y)),
                                unbiased=unbiased)
  np.testing.assert_allclose(float(feat), float(gram), rtol=1e-5)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_self_similarity_and_invariances(kernel):
  x, _ = _pair(30, 12, 12, seed=2)
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  y = np.tanh(x[:, ::-1] * 0.3)
  base = float(cka_lib.cka(x, y, kernel=kernel))
  np.testing.assert_allclose(float(cka_lib.cka(x, x, kernel=kernel)), 1.0,
                             rtol=1e-5)
  rotated = float(cka_lib.cka(x @ q.astype(np.float32), y, kernel=kernel))
  scaled = float(cka_lib.cka(x * 17.0, y * 0.01, kernel=kernel))
  np.testing.assert_allclose([rotated, scaled], [base, base], rtol=1e-4)


def test_not_invariant_to_invertible_linear_map():
  x, y = _pair(50, 10, 10, seed=4)
  a = np.diag(np.geomspace(1, 100, 10)).astype(np.float32)  # invertible
  base = float(cka_lib.cka(x, y))
  mapped = float(cka_lib.cka(x @ a, y))
  assert abs(base - mapped) > 0.05, (base, mapped)


def test_biased_and_unbiased_converge_with_n():
  gaps = []
  for n in (20, 2000):
    x, y = _pair(n, 6, 6, seed=5)
    gaps.append(abs(float(cka_lib.cka(x, y)) -
                    float(cka_lib.cka(x, y, unbiased=True))))
  assert gaps[1] < gaps[0] / 5, gaps


def test_zero_variance_is_nan_and_bad_input_errors():
  x, y = _pair(10, 4, 4)
  assert np.isnan(float(cka_lib.cka(np.ones_like(x) * 2.5, y)))
  assert np.isnan(float(cka_lib.cka(x, np.zeros((10, 40)))))
  with pytest.raises(ValueError, match="same examples"):
    cka_lib.cka(x, y[:9])
  with pytest.raises(ValueError, match="kernel must be one of"):
    cka_lib.cka(x, y, kernel="poly")
  with pytest.raises(ValueError, match="n >= 4"):
    cka_lib.cka(x[:3], y[:3], unbiased=True)
  with pytest.raises(ValueError, match="sigma"):
    cka_lib.cka(x, y, sigma=0.5)


def _stages(n, seed):
  """Two 'teacher' and three 'student' stages of the same n examples."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, 8)).astype(np.float32)
  xs = [base @ rng.normal(size=(8, 16)).astype(np.float32),
        np.tanh(base[:, :4]).reshape(n, 2, 2)]
  ys = [base + 0.3 * rng.normal(size=(n, 8)).astype(np.float32),
        rng.normal(size=(n, 5)).astype(np.float32),
        np.maximum(base, 0) @ rng.normal(size=(8, 3)).astype(np.float32)]
  return xs, ys


def test_minibatch_converges_to_full_unbiased():
  n = 1024
  xs, ys = _stages(n, seed=6)
  full = np.array([[_ref_cka(x, y, unbiased=True) for y in ys] for x in xs])
  acc = cka_lib.MinibatchCKA()
  update = jax.jit(acc.update, static_argnames="num_minibatches")
  errors = []
  for b in (8, 64, 512):
    state = acc.init(len(xs), len(ys))
    state = update(state, xs, ys, num_minibatches=n // b)
    errors.append(np.abs(np.asarray(acc.result(state)) - full).max())
  assert errors[-1] < 0.02 and errors[-1] < errors[0], errors
  # Single full-size "minibatch" is the full unbiased estimate itself.
  state = update(acc.init(len(xs), len(ys)), xs, ys, num_minibatches=1)
  np.testing.assert_allclose(np.asarray(acc.result(state)), full, atol=1e-4)


def test_sharded_accumulator_equals_unsharded():
  devices = jax.devices()
  assert len(devices) == 8
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  xs, ys = _stages(8 * 2 * 16, seed=7)  # 16 minibatches of 16, 2 per device
  acc = cka_lib.MinibatchCKA()
  sharding = NamedSharding(mesh, P("data"))
  xs_s = [jax.device_put(x, sharding) for x in xs]
  ys_s = [jax.device_put(y, sharding) for y in ys]
  replicated = NamedSharding(mesh, P())
  sharded_update = jax.jit(
      lambda s, a, b: acc.update(s, a, b, num_minibatches=16),
      out_shardings=replicated)
  state = sharded_update(acc.init(2, 3), xs_s, ys_s)
  # Unsharded: one minibatch at a time on the default device.
  ref = acc.init(2, 3)
  for i in range(16):
    sl = slice(16 * i, 16 * (i + 1))
    ref = acc.update(ref, [x[sl] for x in xs], [y[sl] for y in ys])
  assert int(state.count) == int(ref.count) == 16
  np.testing.assert_allclose(np.asarray(state.hsic_xy),
                             np.asarray(ref.hsic_xy), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(acc.result(state)),
                             np.asarray(acc.result(ref)), rtol=1e-5)


def test_minibatch_errors_name_the_problem():
  acc = cka_lib.MinibatchCKA()
  xs, ys = _stages(12, seed=8)
  with pytest.raises(ValueError, match="num_minibatches=4"):
    acc.update(acc.init(2, 3), xs, ys, num_minibatches=4)
  with pytest.raises(ValueError, match="2 x-stages"):
    acc.update(acc.init(2, 3), xs[:1], ys)
  assert np.isnan(np.asarray(acc.result(acc.init(2, 3)))).all()
