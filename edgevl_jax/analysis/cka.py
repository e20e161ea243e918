"""Centered kernel alignment (Kornblith et al., ICML 2019) and minibatch CKA.

CKA(K, L) = <Kc, Lc>_F / (||Kc||_F ||Lc||_F) compares two representations of
the same n examples through their n x n kernel (Gram) matrices K and L.

* `cka(x, y, ...)`: CKA on (n, ...) arrays, flattened per example. Linear or
  RBF kernel; biased (Kc = H K H) or unbiased (Song et al. 2012 U-statistic
  HSIC) estimator. For the linear kernel with max(p1, p2) < n the value is
  computed in feature space (p x p products, no n x n matrix); that is exact
  for both estimators (see `_linear_feature_space`).
* `MinibatchCKA`: the estimator of Nguyen, Raghu & Kornblith (ICLR 2021):
  unbiased HSIC summed over minibatches for many (x stage, y stage) pairs at
  once, so a whole dataset is compared with memory for one minibatch only.

Numerics: inputs are cast to float32 (float64 when x64 is enabled and the
input is float64), features are centred before any product, and every matmul
runs at HIGHEST precision (no bf16 passes on TPU/GPU). Every representation
(or Gram matrix) is first divided by the power of two just above its largest
magnitude (exact in floating point, and CKA is invariant to it: linear CKA to
any scale, RBF through its median-relative bandwidth), and the denominator
is sqrt(xx) sqrt(yy), never sqrt(xx yy): without that, float32 products of
fourth powers overflow for activations of std ~1e4 (CKA came out 0, then
NaN) and underflow for std ~1e-6 (NaN). `MinibatchCKA` keeps one such scale
per stage in its state (see `MinibatchCKAState`), so minibatches of very
different magnitudes are summed consistently.

Degenerate input policy: when a representation has (numerically) zero
variance across examples, CKA is 0/0; the functions return NaN rather than
raising, so that they stay jittable and one constant stage does not abort a
whole heat map. "Zero variance" means ||x - mean(x)||_F <= 1e-6 ||x||_F for
`cka`, ||K_centred||_F <= 1e-6 ||K||_F for `cka_from_grams`, a mean
self-HSIC <= 0 for `MinibatchCKA`; for RBF a zero median squared distance
(bandwidth undefined) also gives NaN.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
# Relative size below which a centred Gram matrix is treated as zero.
_DEGENERATE_RTOL = 1e-6
KERNELS = ("linear", "rbf")


def _compute_dtype(x: jax.Array) -> jnp.dtype:
  if x.dtype == jnp.float64 and jax.config.jax_enable_x64:
    return jnp.float64
  return jnp.float32


def flatten(x: jax.Array) -> jax.Array:
  """(n, ...) -> (n, p) in the compute dtype (float32, or float64 under x64)."""
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"CKA input must have an example axis, got a scalar "
                     f"(shape {x.shape}); pass an (n, ...) array.")
  return x.reshape(x.shape[0], -1).astype(_compute_dtype(x))


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def pow2_scale(x: jax.Array, axis=None) -> jax.Array:
  """The power of two just above max|x| (over `axis`); 1 where x is all 0.

  Dividing by it is exact (no rounding), and brings values into (-1, 1].
  """
  m = jnp.max(jnp.abs(x), axis=axis)
  _, e = jnp.frexp(m)  # m = f 2^e with 0.5 <= f < 1
  scale = jnp.ldexp(jnp.ones_like(m), e)
  return jnp.where((m > 0) & jnp.isfinite(m), scale, jnp.ones_like(m))


def _unit_scaled(x: jax.Array) -> jax.Array:
  return x / pow2_scale(x)


def _check_kernel(kernel: str, sigma: float | None) -> None:
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
  if sigma is not None and kernel != "rbf":
    raise ValueError(f"sigma is the RBF bandwidth fraction; it was given "
                     f"({sigma}) with kernel={kernel!r}. Use kernel='rbf' or "
                     f"drop sigma.")
  if sigma is not None and not sigma > 0:
    raise ValueError(f"sigma (RBF bandwidth fraction theta) must be > 0, "
                     f"got {sigma}.")


def gram_linear(x: jax.Array) -> jax.Array:
  """Linear Gram matrix of column-centred features: (n, p) -> (n, n).

  Centring first does not change any centred statistic (H X X^T H and the
  U-centred matrix annihilate rank-one row/column offsets) and avoids the
  cancellation of large feature means.
  """
  x = x - jnp.mean(x, axis=0, keepdims=True)
  return _mm(x, x.T)


def gram_rbf(x: jax.Array, theta: float = 1.0) -> jax.Array:
  """RBF Gram matrix exp(-d_ij^2 / (2 sigma^2)): (n, p) -> (n, n).

  The bandwidth is sigma = theta * sqrt(median(d^2)), the median taken over
  all n^2 squared distances including the zero diagonal (as in the Google
  reference code). `theta` is that fraction, not an absolute bandwidth, so
  the kernel is invariant to isotropic scaling of x. A zero median (more than
  half the pairs coincide) gives NaN.
  """
  x = x - jnp.mean(x, axis=0, keepdims=True)
  dots = _mm(x, x.T)
  sq_norms = jnp.diagonal(dots)
  sq_dist = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * dots, 0.0)
  n = x.shape[0]
  sq_dist = sq_dist * (1.0 - jnp.eye(n, dtype=sq_dist.dtype))
  median = jnp.median(sq_dist)
  scale = jnp.where(median > 0, 2.0 * theta**2 * median, jnp.nan)
  return jnp.exp(-sq_dist / scale)


def gram(x: jax.Array, *, kernel: str = "linear",
         sigma: float | None = None) -> jax.Array:
  """Gram matrix of flattened (n, p) features for `kernel` ('linear'|'rbf')."""
  _check_kernel(kernel, sigma)
  if kernel == "linear":
    return gram_linear(x)
  return gram_rbf(x, 1.0 if sigma is None else sigma)


def center_gram(k: jax.Array, *, unbiased: bool = False) -> jax.Array:
  """Centres an (n, n) Gram matrix.

  Biased: H K H, H = I - 11^T / n. Unbiased: the U-statistic centring of
  Song et al. (2012): zero the diagonal, m = column sums / (n - 2),
  m -= sum(m) / (2 (n - 1)), K -= m_i + m_j, zero the diagonal again; then
  <Ku, Lu>_F / (n (n - 3)) is the unbiased HSIC estimator.
  """
  n = k.shape[0]
  k = (k + k.T) / 2  # exact symmetry makes the two centring passes agree
  if not unbiased:
    k = k - jnp.mean(k, axis=0, keepdims=True)
    return k - jnp.mean(k, axis=1, keepdims=True)
  if n < 4:
    raise ValueError(f"The unbiased HSIC estimator needs n >= 4 examples, "
                     f"got n={n}; use a larger (mini)batch or unbiased=False.")
  off_diag = 1.0 - jnp.eye(n, dtype=k.dtype)
  k = k * off_diag
  means = jnp.sum(k, axis=0) / (n - 2)
  means = means - jnp.sum(means) / (2 * (n - 1))
  k = k - means[:, None] - means[None, :]
  return k * off_diag


def _ratio(xy: jax.Array, xx: jax.Array, yy: jax.Array,
           degenerate: jax.Array) -> jax.Array:
  """xy / sqrt(xx yy), NaN where `degenerate` (see module doc)."""
  # Two square roots: the product xx * yy alone can overflow.
  denom = jnp.sqrt(jnp.abs(xx)) * jnp.sqrt(jnp.abs(yy))
  safe = jnp.where(degenerate | (denom == 0), 1.0, denom)
  return jnp.where(degenerate | (denom == 0), jnp.nan, xy / safe)


def _no_variance(x: jax.Array) -> jax.Array:
  """True when (n, p) features are constant across examples (to rounding)."""
  xc = x - jnp.mean(x, axis=0, keepdims=True)
  return jnp.sqrt(jnp.vdot(xc, xc)) <= _DEGENERATE_RTOL * jnp.sqrt(
      jnp.vdot(x, x))


def cka_from_grams(k: jax.Array, l: jax.Array, *,
                   unbiased: bool = False) -> jax.Array:
  """CKA of two (n, n) Gram matrices (same examples in the same order).

  NaN when a centred Gram matrix is zero relative to the raw one.
  """
  if k.shape != l.shape or k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"Gram matrices must both be (n, n); got {k.shape} and "
                     f"{l.shape}.")
  k, l = _unit_scaled(k), _unit_scaled(l)  # exact; CKA is scale invariant
  kc = center_gram(k, unbiased=unbiased)
  lc = center_gram(l, unbiased=unbiased)
  xx, yy, xy = jnp.vdot(kc, kc), jnp.vdot(lc, lc), jnp.vdot(kc, lc)
  tiny = lambda c, raw: jnp.sqrt(jnp.vdot(c, c)) <= (
      _DEGENERATE_RTOL * jnp.sqrt(jnp.vdot(raw, raw)))
  return _ratio(xy, xx, yy, tiny(kc, k) | tiny(lc, l))


def _linear_feature_space(x: jax.Array, y: jax.Array, *,
                          unbiased: bool) -> jax.Array:
  """Linear CKA without any n x n matrix: O(n p1 p2) time, O(p^2) memory.

  Biased: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F).

  Unbiased: the Song et al. estimator written with K~ = K - diag(K):
    HSIC_1 n (n - 3) = tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n - 1)(n - 2))
                        - 2 / (n - 2) (K~ 1)^T (L~ 1),
  and for K = X X^T each term is a feature-space quantity:
    tr(K~ L~) = ||X^T Y||_F^2 - sum_i |x_i|^2 |y_i|^2,
    K~ 1 = X (X^T 1) - diag(K),   1^T K~ 1 = |X^T 1|^2 - sum_i |x_i|^2.
  Columns are centred first (the estimator is invariant to it; numerics are
  not), which makes X^T 1 = 0 up to rounding; the terms are kept anyway so
  that the formula stays exact.
  """
  n = x.shape[0]
  x = x - jnp.mean(x, axis=0, keepdims=True)
  y = y - jnp.mean(y, axis=0, keepdims=True)
  xtx, yty, xty = _mm(x.T, x), _mm(y.T, y), _mm(x.T, y)
  no = jnp.zeros((), bool)
  if not unbiased:
    return _ratio(jnp.vdot(xty, xty), jnp.vdot(xtx, xtx), jnp.vdot(yty, yty),
                  no)
  if n < 4:
    raise ValueError(f"The unbiased HSIC estimator needs n >= 4 examples, "
                     f"got n={n}; use a larger batch or unbiased=False.")

  def hsic1(a, b, atb, da, db):
    ka1 = _mm(a, jnp.sum(a, axis=0)) - da
    lb1 = _mm(b, jnp.sum(b, axis=0)) - db
    trace = jnp.vdot(atb, atb) - jnp.vdot(da, db)
    return (trace + jnp.sum(ka1) * jnp.sum(lb1) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * jnp.vdot(ka1, lb1)) / (n * (n - 3))

  dx, dy = jnp.sum(x * x, axis=1), jnp.sum(y * y, axis=1)
  return _ratio(hsic1(x, y, xty, dx, dy), hsic1(x, x, xtx, dx, dx),
                hsic1(y, y, yty, dy, dy), no)


def cka(x: jax.Array, y: jax.Array, *, kernel: str = "linear",
        unbiased: bool = False, sigma: float | None = None) -> jax.Array:
  """CKA between two representations of the same n examples.

  Args:
    x: (n, ...) features, flattened per example to (n, p1).
    y: (n, ...) features, flattened to (n, p2).
    kernel: 'linear' or 'rbf'.
    unbiased: use the unbiased (U-statistic) HSIC estimator (needs n >= 4).
    sigma: RBF only: the bandwidth as a FRACTION theta of the median pairwise
      distance, sigma_abs = theta * sqrt(median(d^2)); default 1.0.

  Returns:
    A scalar in the compute dtype; NaN when x or y is constant across
    examples (||x - mean(x)||_F <= 1e-6 ||x||_F).
  """
  _check_kernel(kernel, sigma)
  x, y = flatten(x), flatten(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x and y must hold the same examples: got n={x.shape[0]}"
                     f" and n={y.shape[0]}.")
  if x.shape[0] < 2:
    raise ValueError(f"CKA needs at least 2 examples, got n={x.shape[0]}.")
  # Exact power-of-two rescaling (module doc): correct at any activation scale.
  x, y = _unit_scaled(x), _unit_scaled(y)
  n, p = x.shape[0], max(x.shape[1], y.shape[1])
  if kernel == "linear" and p < n:
    value = _linear_feature_space(x, y, unbiased=unbiased)
  else:
    value = cka_from_grams(gram(x, kernel=kernel, sigma=sigma),
                           gram(y, kernel=kernel, sigma=sigma),
                           unbiased=unbiased)
  return jnp.where(_no_variance(x) | _no_variance(y), jnp.nan, value)


class MinibatchCKAState(NamedTuple):
  """Running sums of unbiased HSIC over minibatches (a pytree).

  For the linear kernel the sums are stored relative to a per-stage scale
  (a power of two, the largest seen so far), so activations of any
  magnitude neither overflow nor underflow float32:
  true sum_xy[i, j] = hsic_xy[i, j] * scale_x[i]^2 * scale_y[j]^2 (and
  ^4 for the self terms). RBF HSIC does not depend on the scale (its
  bandwidth is relative), so there the sums are the plain sums.

  Attributes:
    hsic_xy: (I, J) sum over minibatches of HSIC_1(K_i, L_j).
    hsic_xx: (I,) sum of HSIC_1(K_i, K_i).
    hsic_yy: (J,) sum of HSIC_1(L_j, L_j).
    count: number of minibatches accumulated (int32 scalar).
    scale_x: (I,) feature scale of each x-stage (0 before any update);
      None in a hand-built state means 1 (sums in raw units).
    scale_y: (J,) likewise for the y-stages.
  """
  hsic_xy: jax.Array
  hsic_xx: jax.Array
  hsic_yy: jax.Array
  count: jax.Array
  scale_x: jax.Array | None = None
  scale_y: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class MinibatchCKA:
  """Minibatch CKA (Nguyen et al. 2021) for I x-stages vs J y-stages.

  CKA_ij = mean_b HSIC_1(K_ib, L_jb) / sqrt(mean_b HSIC_1(K_ib, K_ib)
  mean_b HSIC_1(L_jb, L_jb)), with unbiased HSIC per minibatch b, so the
  estimate converges to the full-data value without ever holding an n x n
  matrix (memory: (I + J) b x b per minibatch).

  Sharding design: unbiased HSIC is a per-minibatch statistic, so minibatches
  (not examples within one) are what is distributed. `update` accepts a
  global batch of `num_minibatches * b` examples, reshapes it to
  (num_minibatches, b, ...) and `vmap`s the per-minibatch computation; with
  the batch laid along the mesh's data axis and `num_minibatches` a multiple
  of the device count, each device holds whole minibatches, computes their
  Gram matrices locally and only the (I, J) sums (and (I,), (J,) scales) are
  all-reduced.

  Attributes:
    kernel: 'linear' or 'rbf' (RBF bandwidth from each minibatch's median).
    sigma: RBF bandwidth fraction theta (see `cka`).
  """
  kernel: str = "linear"
  sigma: float | None = None

  def __post_init__(self):
    _check_kernel(self.kernel, self.sigma)

  def init(self, num_x: int, num_y: int,
           dtype: jnp.dtype = jnp.float32) -> MinibatchCKAState:
    """Zero state for `num_x` x-stages and `num_y` y-stages."""
    return MinibatchCKAState(jnp.zeros((num_x, num_y), dtype),
                             jnp.zeros((num_x,), dtype),
                             jnp.zeros((num_y,), dtype),
                             jnp.zeros((), jnp.int32),
                             jnp.zeros((num_x,), dtype),
                             jnp.zeros((num_y,), dtype))

  def _minibatch_hsic(self, xs, ys):
    """Unbiased HSIC matrices of one minibatch: ((I, J), (I,), (J,))."""
    def u_centred(f):
      k = gram(flatten(f), kernel=self.kernel, sigma=self.sigma)
      return center_gram(k, unbiased=True)
    b = xs[0].shape[0]
    ks = jnp.stack([u_centred(f) for f in xs])
    ls = jnp.stack([u_centred(f) for f in ys])
    ein = lambda eq, a, c: jnp.einsum(eq, a, c, precision=_HIGHEST)
    scale = 1.0 / (b * (b - 3))
    return (ein("iab,jab->ij", ks, ls) * scale,
            ein("iab,iab->i", ks, ks) * scale,
            ein("jab,jab->j", ls, ls) * scale)

  def update(self, state: MinibatchCKAState, x_batch: Sequence[jax.Array],
             y_batch: Sequence[jax.Array], *,
             num_minibatches: int = 1) -> MinibatchCKAState:
    """Adds `num_minibatches` minibatches to the sums (jittable).

    Args:
      state: running sums from `init` / a previous `update`.
      x_batch: I arrays (B, ...), one per x-stage, same B examples.
      y_batch: J arrays (B, ...) for the same examples.
      num_minibatches: B is split into this many (>= 1) minibatches of
        B / k >= 4 consecutive examples (lay k along the data axis to shard).
    """
    xs, ys = list(x_batch), list(y_batch)
    if len(xs) != state.hsic_xx.shape[0] or len(ys) != state.hsic_yy.shape[0]:
      raise ValueError(f"State was made for {state.hsic_xx.shape[0]} x-stages "
                       f"and {state.hsic_yy.shape[0]} y-stages; got "
                       f"{len(xs)} and {len(ys)}.")
    sizes = {f.shape[0] for f in xs + ys}
    if len(sizes) != 1:
      raise ValueError(f"Every stage must hold the same examples; got batch "
                       f"sizes {sorted(sizes)}.")
    total = sizes.pop()
    k = num_minibatches
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(
          f"num_minibatches={k!r}: must be a positive int, the number of "
          f"minibatches of >= 4 examples the batch of {total} is split into "
          "(1 for the whole batch as one minibatch).")
    if total % k or total // k < 4:
      raise ValueError(f"Batch of {total} cannot be split into "
                       f"num_minibatches={k} minibatches of >= 4 examples "
                       f"(unbiased HSIC needs n >= 4); change the batch size "
                       f"or num_minibatches.")

    def split(f):
      f = jnp.asarray(f)
      f = f.reshape((k, total // k, -1)).astype(_compute_dtype(f))
      s = pow2_scale(f, axis=(1, 2))  # (k,): exact per-minibatch rescaling
      return f / s[:, None, None], s

    xs_s, ys_s = [split(f) for f in xs], [split(f) for f in ys]
    xy, xx, yy = jax.vmap(self._minibatch_hsic)(
        [f for f, _ in xs_s], [f for f, _ in ys_s])
    dt = state.hsic_xy.dtype
    old_x = (jnp.ones_like(state.hsic_xx) if state.scale_x is None
             else state.scale_x)
    old_y = (jnp.ones_like(state.hsic_yy) if state.scale_y is None
             else state.scale_y)
    sx = jnp.stack([s for _, s in xs_s], axis=1).astype(dt)  # (k, I)
    sy = jnp.stack([s for _, s in ys_s], axis=1).astype(dt)  # (k, J)
    new_x = jnp.maximum(old_x, jnp.max(sx, axis=0))
    new_y = jnp.maximum(old_y, jnp.max(sy, axis=0))
    if self.kernel == "linear":
      # Gram ~ scale^2: bring every term to the (new) per-stage scale. All
      # factors are powers of two <= 1, so this is exact and cannot overflow.
      fx, fy = (sx / new_x) ** 2, (sy / new_y) ** 2
      gx, gy = (old_x / new_x) ** 2, (old_y / new_y) ** 2
    else:
      fx, fy = jnp.ones_like(sx), jnp.ones_like(sy)
      gx, gy = jnp.ones_like(old_x), jnp.ones_like(old_y)
    xy = jnp.sum(xy.astype(dt) * fx[:, :, None] * fy[:, None, :], 0)
    xx = jnp.sum(xx.astype(dt) * fx * fx, 0)
    yy = jnp.sum(yy.astype(dt) * fy * fy, 0)
    return MinibatchCKAState(
        state.hsic_xy * gx[:, None] * gy[None, :] + xy,
        state.hsic_xx * gx * gx + xx,
        state.hsic_yy * gy * gy + yy,
        state.count + k, new_x, new_y)

  def result(self, state: MinibatchCKAState) -> jax.Array:
    """(I, J) CKA matrix; NaN for stages whose mean self-HSIC is not > 0."""
    xx, yy = state.hsic_xx[:, None], state.hsic_yy[None, :]
    degenerate = (xx <= 0) | (yy <= 0) | (state.count == 0)
    return _ratio(state.hsic_xy, xx, yy, degenerate)
