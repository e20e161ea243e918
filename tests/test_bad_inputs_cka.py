"""CKA is correct at any activation scale, and bad accumulator input is named.

Before: float32 sqrt(xx * yy) overflowed for activations of std ~1e4 (CKA
0.0, then NaN at 1e8) and underflowed at ~1e-6 (NaN). Checked here against
an independent float64 numpy reference at scales 1e-6 .. 1e8, linear and
RBF, biased and unbiased, on both computation paths (feature space, p < n;
Gram matrices, p >= n), and for the minibatch accumulator.
"""
import jax
import numpy as np
import pytest

from edgevl_jax.analysis import cka as cka_lib

SCALES = (1e-6, 1e-3, 1.0, 150.0, 1e4, 1e8)


def _ref_gram(x, kernel):
  x = x.reshape(x.shape[0], -1).astype(np.float64)
  if kernel == "linear":
    return x @ x.T
  d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
  return np.exp(-d2 / (2 * np.median(d2)))


def _ref_hsic(k, l, unbiased):
  n = k.shape[0]
  if not unbiased:
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2
  kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
  one = np.ones(n)
  return (np.sum(kt * lt) + (one @ kt @ one) * (one @ lt @ one)
          / ((n - 1) * (n - 2)) - 2 / (n - 2) * (kt @ one) @ (lt @ one)) / (
              n * (n - 3))


def _ref_cka(x, y, kernel, unbiased):
  k, l = _ref_gram(x, kernel), _ref_gram(y, kernel)
  return _ref_hsic(k, l, unbiased) / np.sqrt(
      _ref_hsic(k, k, unbiased) * _ref_hsic(l, l, unbiased))


def _pair(n, p1, p2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, p1)) + 3.0
  y = np.tanh(x @ rng.normal(size=(p1, p2)) / np.sqrt(p1)) + 0.5 * rng.normal(
      size=(n, p2))
  return x, y


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("n,p1,p2", [(40, 7, 5), (12, 30, 50)])
def test_cka_matches_float64_at_any_scale(scale, kernel, unbiased, n, p1, p2):
  x, y = _pair(n, p1, p2)
  want = _ref_cka(x, y, kernel, unbiased)
  # x and y at different scales too: y stays at unit scale.
  got = cka_lib.cka((x * scale).astype(np.float32), y.astype(np.float32),
                    kernel=kernel, unbiased=unbiased)
  both = cka_lib.cka((x * scale).astype(np.float32),
                     (y * scale).astype(np.float32), kernel=kernel,
                     unbiased=unbiased)
  np.testing.assert_allclose([float(got), float(both)], [want, want],
                             rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_from_grams_at_any_scale(scale, unbiased):
  x, y = _pair(16, 20, 24, seed=1)
  k = cka_lib.gram_linear(np.asarray(x * scale, np.float32))
  l = cka_lib.gram_linear(np.asarray(y * scale, np.float32))
  got = cka_lib.cka_from_grams(k, l, unbiased=unbiased)
  np.testing.assert_allclose(float(got), _ref_cka(x, y, "linear", unbiased),
                             rtol=2e-4, atol=2e-5)


def _ref_minibatch(xs, ys, kernel, b):
  """float64 minibatch CKA: sums of per-minibatch unbiased HSIC."""
  n = xs[0].shape[0]
  out = np.zeros((len(xs), len(ys)))
  for i, x in enumerate(xs):
    for j, y in enumerate(ys):
      xy = xx = yy = 0.0
      for s in range(0, n, b):
        k, l = _ref_gram(x[s:s + b], kernel), _ref_gram(y[s:s + b], kernel)
        xy += _ref_hsic(k, l, True)
        xx += _ref_hsic(k, k, True)
        yy += _ref_hsic(l, l, True)
      out[i, j] = xy / np.sqrt(xx * yy)
  return out


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("scale", SCALES)
def test_minibatch_cka_at_any_scale(kernel, scale):
  x, y = _pair(64, 6, 5, seed=2)
  z = np.random.default_rng(3).normal(size=(64, 3)) + x[:, :3]
  xs, ys = [x * scale, z], [y, y * scale]
  want = _ref_minibatch(xs, ys, kernel, b=16)
  acc = cka_lib.MinibatchCKA(kernel=kernel)
  f32 = lambda fs: [np.asarray(f, np.float32) for f in fs]
  # All four minibatches at once (the sharded layout) ...
  state = jax.jit(acc.update, static_argnames="num_minibatches")(
      acc.init(2, 2), f32(xs), f32(ys), num_minibatches=4)
  np.testing.assert_allclose(np.asarray(acc.result(state)), want, rtol=2e-4,
                             atol=2e-5)
  # ... or one at a time: the same sums.
  one = acc.init(2, 2)
  for s in range(0, 64, 16):
    one = acc.update(one, f32([f[s:s + 16] for f in xs]),
                     f32([f[s:s + 16] for f in ys]))
  np.testing.assert_allclose(np.asarray(acc.result(one)), want, rtol=2e-4,
                             atol=2e-5)


def test_minibatches_of_very_different_magnitude_sum_consistently():
  """A stage whose activations grow by 1e9 between minibatches (e.g. a
  diverging network) is summed with one consistent scale."""
  x, y = _pair(32, 6, 5, seed=4)
  growth = np.repeat([1e-3, 1.0, 1e3, 1e6], 8)[:, None]
  xs, ys = [x * growth], [y]
  want = _ref_minibatch(xs, ys, "linear", b=8)
  acc = cka_lib.MinibatchCKA()
  state = acc.init(1, 1)
  for s in range(0, 32, 8):
    state = acc.update(state, [np.float32(xs[0][s:s + 8])],
                       [np.float32(y[s:s + 8])])
  np.testing.assert_allclose(np.asarray(acc.result(state)), want, rtol=2e-4)
  # Reversed order (largest first) gives the same answer.
  state = acc.init(1, 1)
  for s in range(24, -1, -8):
    state = acc.update(state, [np.float32(xs[0][s:s + 8])],
                       [np.float32(y[s:s + 8])])
  np.testing.assert_allclose(np.asarray(acc.result(state)), want, rtol=2e-4)


def test_hand_built_state_without_scales_still_works():
  x, y = _pair(16, 4, 4, seed=5)
  acc = cka_lib.MinibatchCKA()
  zero = acc.init(1, 1)
  legacy = cka_lib.MinibatchCKAState(zero.hsic_xy, zero.hsic_xx,
                                     zero.hsic_yy, zero.count)
  state = acc.update(legacy, [np.float32(x)], [np.float32(y)])
  np.testing.assert_allclose(float(acc.result(state)[0, 0]),
                             _ref_minibatch([x], [y], "linear", 16)[0, 0],
                             rtol=2e-4)


@pytest.mark.parametrize("k", [0, -2, 2.0])
def test_num_minibatches_must_be_a_positive_int(k):
  acc = cka_lib.MinibatchCKA()
  x, y = _pair(16, 4, 4)
  with pytest.raises(ValueError, match=rf"num_minibatches={k!r}: must be a "
                     r"positive int, the number of minibatches of >= 4 "
                     r"examples the batch of 16 is split into"):
    acc.update(acc.init(1, 1), [np.float32(x)], [np.float32(y)],
               num_minibatches=k)
