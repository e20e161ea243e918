"""Bilinear sampling of feature maps at continuous points, gather-based.

`grid_sample` is `torch.nn.functional.grid_sample(mode='bilinear',
padding_mode='zeros')` for channels-last maps, written with four gathers so
that it runs (and differentiates) anywhere XLA does, with no custom kernel:

  * grid points are (x, y) in [-1, 1]; with `align_corners=True` (what DAT
    uses) -1 and +1 are the centres of the first and last pixels, otherwise
    the outer edges of those pixels;
  * each of the four neighbouring pixels that lies outside the map reads as
    zero (padding_mode='zeros'), so a point far outside gives 0 and a point
    within one pixel of the border blends towards 0;
  * gradients flow to the map (scatter-add of the bilinear weights) and to the
    grid (the slope of the bilinear interpolant); `floor` has no gradient, so
    autodiff gives exactly the piecewise-linear derivative torch computes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _unnormalise(coord: jax.Array, size: int,
                 align_corners: bool) -> jax.Array:
  """[-1, 1] -> pixel index units (torch's `grid_sampler_unnormalize`)."""
  if align_corners:
    return (coord + 1) / 2 * (size - 1)
  return ((coord + 1) * size - 1) / 2


def grid_sample(inputs: jax.Array, grid: jax.Array, *,
                align_corners: bool = True) -> jax.Array:
  """Samples `inputs` bilinearly at `grid`, zero outside the map.

  Args:
    inputs: (N, H, W, C) feature maps.
    grid: (N, Ho, Wo, 2) sampling points, last axis (x, y) normalised to
      [-1, 1] (x along W, y along H); points outside are allowed.
    align_corners: the torch flag (DAT uses True).

  Returns:
    (N, Ho, Wo, C) in the dtype of `inputs`.
  """
  n, h, w, c = inputs.shape
  if grid.shape[0] != n or grid.shape[-1] != 2:
    raise ValueError(f"grid_sample: grid must be (N={n}, Ho, Wo, 2), got "
                     f"{grid.shape}.")
  ho, wo = grid.shape[1:3]
  x = _unnormalise(grid[..., 0], w, align_corners)
  y = _unnormalise(grid[..., 1], h, align_corners)
  x0, y0 = jnp.floor(x), jnp.floor(y)
  # The four neighbours (nw, ne, sw, se) stacked on axis 1, each weighted by
  # the opposite corner's distance as in torch (nw = (x1 - x) * (y1 - y)).
  xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=1)  # (N, 4, Ho, Wo)
  ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=1)
  # Written without abs: its zero derivative at integer points (e.g. DAT's
  # positions clipped to +-1) would differ from torch's one-sided slope.
  wx = jnp.stack([x0 + 1 - x, x - x0] * 2, axis=1)
  wy = jnp.stack([y0 + 1 - y] * 2 + [y - y0] * 2, axis=1)
  inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
  weight = jnp.where(inside, wx * wy, 0.0).astype(inputs.dtype)
  # Clip before the int cast so far-away points cannot overflow; their
  # weight is zero anyway. One gather (and one scatter-add in the backward
  # pass) for all four corners keeps the compiled graph small.
  idx = jnp.clip(ys, 0, h - 1) * w + jnp.clip(xs, 0, w - 1)
  flat = inputs.reshape(n, h * w, c)
  vals = jax.vmap(lambda f, i: f[i])(flat, idx.astype(jnp.int32).reshape(n, -1))
  vals = vals.reshape(n, 4, ho, wo, c) * weight[..., None]
  return vals.sum(axis=1)
