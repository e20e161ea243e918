"""Class geometry of the synthetic RGB-D scenes, as signed distance functions.

The class of a scene is its geometry: one or a few primitives resting on the
floor at y = 0, about one unit tall. Every function maps points q (..., 3) in
the object's local frame (y up, object centred on the origin in x-z) to a
signed distance (...,) that never over-estimates the true distance, which is
what sphere tracing needs. Colours, textures and lighting are chosen
elsewhere (render.py) and never depend on the class.
"""
from typing import Callable

import numpy as np

CLASS_NAMES = (
    "sphere", "cube", "cylinder", "cone", "torus", "pyramid",
    "stack of two cubes", "row of three balls", "ring of pillars", "arch",
    "wall", "staircase")

# Shape names that are not classes, so pseudo-labelling against the superset
# vocabulary can pick a wrong name.
DISTRACTOR_NAMES = (
    "capsule", "prism", "ellipsoid", "tetrahedron", "octahedron", "table",
    "chair", "bowl", "tower", "bridge", "fence", "disc")

Sdf = Callable[[np.ndarray], np.ndarray]


def _length(v: np.ndarray) -> np.ndarray:
  # Explicit components: numpy reductions over a size-3 last axis are slow.
  return np.sqrt(sum(v[..., i] * v[..., i] for i in range(v.shape[-1])))


def sphere(q, centre=(0.0, 0.6, 0.0), radius=0.6):
  return _length(q - np.asarray(centre, np.float32)) - radius


def box(q, centre, half):
  d = np.abs(q - np.asarray(centre, np.float32)) - np.asarray(half, np.float32)
  outside = _length(np.maximum(d, 0.0))
  inside = np.minimum(np.maximum(np.maximum(d[..., 0], d[..., 1]),
                                  d[..., 2]), 0.0)
  return outside + inside


def rotated_box(q, centre, half, yaw):
  """Box turned by `yaw` radians about the vertical axis through `centre`."""
  c, s = np.cos(yaw), np.sin(yaw)
  p = q - np.asarray(centre, np.float32)
  x = c * p[..., 0] - s * p[..., 2]
  z = s * p[..., 0] + c * p[..., 2]
  return box(np.stack([x, p[..., 1], z], -1), (0.0, 0.0, 0.0), half)


def cylinder(q, centre=(0.0, 0.0, 0.0), radius=0.45, height=1.2):
  """Upright cylinder standing on y = centre[1]."""
  p = q - np.asarray(centre, np.float32)
  r = np.sqrt(p[..., 0] ** 2 + p[..., 2] ** 2)
  dr = r - radius
  dy = np.abs(p[..., 1] - height / 2) - height / 2
  d = np.stack([dr, dy], -1)
  return _length(np.maximum(d, 0.0)) + np.minimum(np.maximum(dr, dy), 0.0)


def cone(q, radius=0.65, height=1.35):
  """Upright cone, base on the floor (intersection of bounds: a lower bound)."""
  r = np.sqrt(q[..., 0] ** 2 + q[..., 2] ** 2)
  slant = (r * height - (height - q[..., 1]) * radius) / np.hypot(height, radius)
  return np.maximum(slant, -q[..., 1])


def torus(q, major=0.6, minor=0.24):
  """Torus lying flat on the floor."""
  r = np.sqrt(q[..., 0] ** 2 + q[..., 2] ** 2) - major
  return np.sqrt(r * r + (q[..., 1] - minor) ** 2) - minor


def pyramid(q, half_base=0.62, height=1.25):
  """Square pyramid; max of face-plane distances (a lower bound outside)."""
  k = np.hypot(height, half_base)
  fx = (np.abs(q[..., 0]) * height + q[..., 1] * half_base
        - height * half_base) / k
  fz = (np.abs(q[..., 2]) * height + q[..., 1] * half_base
        - height * half_base) / k
  return np.maximum(np.maximum(fx, fz), -q[..., 1])


def stack_of_two_cubes(q):
  lower = box(q, (0.0, 0.42, 0.0), (0.42, 0.42, 0.42))
  upper = rotated_box(q, (0.0, 1.12, 0.0), (0.28, 0.28, 0.28), np.pi / 4)
  return np.minimum(lower, upper)


def row_of_three_balls(q):
  d = sphere(q, (-0.8, 0.33, 0.0), 0.33)
  d = np.minimum(d, sphere(q, (0.0, 0.33, 0.0), 0.33))
  return np.minimum(d, sphere(q, (0.8, 0.33, 0.0), 0.33))


def ring_of_pillars(q):
  d = None
  for k in range(5):
    a = 2 * np.pi * k / 5
    c = cylinder(q, (0.75 * np.cos(a), 0.0, 0.75 * np.sin(a)), 0.17, 0.95)
    d = c if d is None else np.minimum(d, c)
  return d


def arch(q):
  d = box(q, (-0.55, 0.5, 0.0), (0.17, 0.5, 0.2))
  d = np.minimum(d, box(q, (0.55, 0.5, 0.0), (0.17, 0.5, 0.2)))
  return np.minimum(d, box(q, (0.0, 1.12, 0.0), (0.8, 0.14, 0.22)))


def wall(q):
  return box(q, (0.0, 0.5, 0.0), (1.05, 0.5, 0.12))


def staircase(q):
  d = box(q, (-0.6, 0.17, 0.0), (0.3, 0.17, 0.45))
  d = np.minimum(d, box(q, (0.0, 0.34, 0.0), (0.3, 0.34, 0.45)))
  return np.minimum(d, box(q, (0.6, 0.51, 0.0), (0.3, 0.51, 0.45)))


def _cube(q):
  return box(q, (0.0, 0.5, 0.0), (0.5, 0.5, 0.5))


CLASS_SDFS: tuple[Sdf, ...] = (
    sphere, _cube, cylinder, cone, torus, pyramid, stack_of_two_cubes,
    row_of_three_balls, ring_of_pillars, arch, wall, staircase)

assert len(CLASS_SDFS) == len(CLASS_NAMES)
