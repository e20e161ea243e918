"""Vectorised numpy sphere-tracer for the synthetic RGB-D scenes.

A scene is one class object (geometry.py) on a floor inside a round room,
seen from a random camera. The renderer returns the RGB image and the
aligned depth map (distance from the camera centre along each pixel's ray,
metres) of the same rays, so the pair is co-registered by construction.

Nuisances (never tied to the class): object position, size and turn, camera
azimuth / elevation / distance, object colour and texture, floor colour and
pattern, wall colour, light direction, exposure and sensor noise. The class
therefore lives in the geometry, which depth keeps and colour hides.

All scenes of one class are traced together: arrays are (B, P, 3) with
B scenes and P = H * W rays.
"""
from typing import Sequence

import numpy as np

from edgevl_jax.data.synthetic_rgbd import geometry

PALETTE = {
    "red": (200, 30, 30), "orange": (240, 130, 20), "yellow": (230, 210, 40),
    "green": (40, 160, 60), "blue": (40, 80, 200), "purple": (130, 50, 170),
    "pink": (240, 130, 180), "white": (235, 235, 235), "black": (35, 35, 35),
    "brown": (120, 75, 40), "cyan": (40, 200, 210), "grey": (128, 128, 128)}
COLOUR_NAMES = tuple(PALETTE)
_RGB = np.asarray(list(PALETTE.values()), np.float32) / 255.0
TEXTURES = ("plain", "striped", "checkered", "dotted")
FLOOR_PATTERNS = ("plain", "tiled", "checkered")
LIGHTS = ("the left", "the right", "above", "the front", "behind")

_ROOM_RADIUS = 6.0
_FOV = np.deg2rad(48.0)
_MARCH_STEPS = 48
# Radius (object units) of a sphere around (0, 0.6, 0) holding every class.
_BOUND_RADIUS = 1.3


def sample_scenes(rng: np.random.Generator, labels: np.ndarray) -> dict:
  """Draws the nuisance parameters of len(labels) scenes, (N, ...) arrays."""
  n = len(labels)
  c = len(COLOUR_NAMES)
  obj = rng.integers(0, c, n)
  floor = (obj + rng.integers(1, c, n)) % c  # never the object's colour
  wall = rng.integers(0, c, n)
  return dict(
      label=np.asarray(labels, np.int64),
      scale=rng.uniform(0.8, 1.1, n).astype(np.float32),
      yaw=rng.uniform(0, 2 * np.pi, n).astype(np.float32),
      offset=rng.uniform(-0.25, 0.25, (n, 2)).astype(np.float32),
      azimuth=rng.uniform(0, 2 * np.pi, n).astype(np.float32),
      elevation=np.deg2rad(rng.uniform(14, 38, n)).astype(np.float32),
      distance=rng.uniform(2.6, 3.3, n).astype(np.float32),
      object_colour=obj, floor_colour=floor, wall_colour=wall,
      texture=rng.integers(0, len(TEXTURES), n),
      floor_pattern=rng.integers(0, len(FLOOR_PATTERNS), n),
      light=rng.integers(0, len(LIGHTS), n),
      exposure=rng.uniform(0.8, 1.15, n).astype(np.float32),
      noise_seed=rng.integers(0, 2**31, n))


def _normalize(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _camera(s, image_size):
  """Ray origins (B, 1, 3), directions (B, P, 3) and camera axes (B, 3) x 3."""
  b = len(s["label"])
  target = np.zeros((b, 3), np.float32)
  target[:, 0], target[:, 2] = s["offset"][:, 0], s["offset"][:, 1]
  target[:, 1] = 0.5 * s["scale"]
  ce, se = np.cos(s["elevation"]), np.sin(s["elevation"])
  eye = target + s["distance"][:, None] * np.stack(
      [ce * np.cos(s["azimuth"]), se, ce * np.sin(s["azimuth"])], -1)
  fwd = _normalize(target - eye)
  right = _normalize(np.cross(fwd, np.array([0.0, 1.0, 0.0], np.float32)))
  up = np.cross(right, fwd)
  lin = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1
  v, u = np.meshgrid(lin, lin, indexing="ij")
  u, v = u.reshape(1, -1, 1), v.reshape(1, -1, 1)
  k = np.tan(_FOV / 2)
  dirs = _normalize(fwd[:, None] + k * (u * right[:, None] - v * up[:, None]))
  return eye[:, None, :], dirs.astype(np.float32), (right, up, fwd)


def _to_local(p, s, idx=None):
  """World points -> object-local points (object moved, turned, scaled)."""
  sel = (lambda a: a[:, None]) if idx is None else (lambda a: a[idx])
  off, yaw, scale = sel(s["offset"]), sel(s["yaw"]), sel(s["scale"])
  x, z = p[..., 0] - off[..., 0], p[..., 2] - off[..., 1]
  c, sn = np.cos(yaw), np.sin(yaw)
  q = np.stack([c * x - sn * z, p[..., 1], sn * x + c * z], -1)
  return q / scale[..., None], scale


def _background_hit(origin, dirs):
  """Distance to the floor (y = 0) or the round wall, whichever is first."""
  dy = dirs[..., 1]
  t_floor = np.where(dy < -1e-6, -origin[..., 1] / np.minimum(dy, -1e-6),
                     np.inf)
  ox, oz = origin[..., 0], origin[..., 2]
  dx, dz = dirs[..., 0], dirs[..., 2]
  a = dx * dx + dz * dz + 1e-12
  bq = ox * dx + oz * dz
  cq = ox * ox + oz * oz - _ROOM_RADIUS**2
  t_wall = (-bq + np.sqrt(bq * bq - a * cq)) / a
  on_floor = t_floor < t_wall
  return np.minimum(t_floor, t_wall), on_floor


def _object_albedo(q, s, idx):
  """Object colour with its texture in object-local coordinates (M, 3)."""
  base = _RGB[s["object_colour"][idx]]
  dark = base * 0.45 + 0.05
  tex = s["texture"][idx]
  stripes = np.floor(q[:, 1] * 7.0) % 2 == 1
  checks = np.floor(q * 5.0).sum(-1) % 2 == 1
  frac = q * 5.0 - np.round(q * 5.0)
  dots = np.sum(frac * frac, -1) < 0.09
  second = (((tex == 1) & stripes) | ((tex == 2) & checks)
            | ((tex == 3) & dots))
  return np.where(second[:, None], dark, base)


def _floor_albedo(p, s, idx):
  base = _RGB[s["floor_colour"][idx]]
  pat = s["floor_pattern"][idx]
  tiles = (np.abs(p[:, 0] * 2 - np.round(p[:, 0] * 2)) < 0.06) | (
      np.abs(p[:, 2] * 2 - np.round(p[:, 2] * 2)) < 0.06)
  checks = (np.floor(p[:, 0] * 1.5) + np.floor(p[:, 2] * 1.5)) % 2 == 1
  second = ((pat == 1) & tiles) | ((pat == 2) & checks)
  return np.where(second[:, None], base * 0.6 + 0.15, base)


def _light_dirs(s, axes):
  right, up, fwd = axes
  world_up = np.broadcast_to(np.array([0.0, 1.0, 0.0], np.float32), fwd.shape)
  options = np.stack([-right, right, world_up, -fwd, fwd], 1)  # (B, 5, 3)
  d = options[np.arange(len(fwd)), s["light"]] + 0.7 * world_up
  return _normalize(d)


def _march(sdf, s, origin, dirs, t_bg):
  """Sphere-traces, in object-local space, the rays that enter its bounds.

  Rays are turned into the object's frame once (the frame is a rotation,
  translation and uniform scale, so local distance = world distance /
  scale) and only rays entering the bounding sphere are traced; converged
  or escaped rays leave the working set, so the cost follows the object's
  screen area rather than the image size.

  Returns hit (B, P) bool and world distance (B, P) float32 of the object.
  """
  b, hw = t_bg.shape
  o_loc, _ = _to_local(origin, s)                       # (B, 1, 3)
  d_loc, _ = _to_local(dirs + origin, s)
  d_loc = (d_loc - o_loc) * s["scale"][:, None, None]  # unit, rotated only
  o_loc = np.broadcast_to(o_loc, d_loc.shape)
  t_max = t_bg / s["scale"][:, None]
  oc = o_loc - np.array([0.0, 0.6, 0.0], np.float32)
  bq = np.sum(d_loc * oc, -1)
  disc = bq * bq - (np.sum(oc * oc, -1) - _BOUND_RADIUS**2)
  root = np.sqrt(np.maximum(disc, 0.0))
  t_in = np.maximum(-bq - root, 0.0)
  t_out = np.minimum(-bq + root, t_max)
  hit = np.zeros(b * hw, bool)
  t_hit = np.zeros(b * hw, np.float32)
  ray = np.nonzero(((disc > 0) & (t_in < t_out)).reshape(-1))[0]
  t = t_in.reshape(-1)[ray]
  t_end = t_out.reshape(-1)[ray]
  o_r, d_r = o_loc.reshape(-1, 3)[ray], d_loc.reshape(-1, 3)[ray]
  for _ in range(_MARCH_STEPS):
    if ray.size == 0:
      break
    dist = sdf(o_r + t[:, None] * d_r)
    t = t + dist
    converged = dist < 1e-3 * (1 + t)
    hit[ray[converged]] = True
    t_hit[ray[converged]] = t[converged]
    keep = ~converged & (t < t_end)
    if not keep.all():
      ray, t, t_end = ray[keep], t[keep], t_end[keep]
      o_r, d_r = o_r[keep], d_r[keep]
  scale = np.repeat(s["scale"], hw)
  return hit.reshape(b, hw), (t_hit * scale).reshape(b, hw)


def render(s: dict, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Renders scenes that share one class.

  Args:
    s: scene parameters from `sample_scenes`, all with the same label.
    image_size: output height and width H = W.

  Returns:
    rgb: uint8 (B, H, W, 3); depth: float32 (B, H, W), metres along the ray.
  """
  label = int(s["label"][0])
  if np.any(s["label"] != label):
    raise ValueError("render() traces one class at a time; got labels "
                     f"{np.unique(s['label'])}.")
  sdf = geometry.CLASS_SDFS[label]
  b, hw = len(s["label"]), image_size * image_size
  origin, dirs, axes = _camera(s, image_size)
  t_bg, on_floor = _background_hit(origin, dirs)

  def scene_sdf(p, idx=None):
    q, scale = _to_local(p, s, idx)
    return sdf(q) * scale

  hit_obj, t_obj = _march(sdf, s, origin, dirs, t_bg)
  depth = np.where(hit_obj, t_obj, t_bg).astype(np.float32)

  flat = depth.reshape(-1)
  scene_of = np.repeat(np.arange(b), hw)
  p = (origin + depth[..., None] * dirs).reshape(-1, 3)
  obj, flo = hit_obj.reshape(-1), (~hit_obj & on_floor).reshape(-1)
  wal = ~obj & ~flo
  normal = np.empty_like(p)
  albedo = np.empty_like(p)
  normal[flo] = (0.0, 1.0, 0.0)
  albedo[flo] = _floor_albedo(p[flo], s, scene_of[flo])
  normal[wal] = -_normalize(p[wal] * np.array([1.0, 0.0, 1.0], np.float32))
  albedo[wal] = _RGB[s["wall_colour"][scene_of[wal]]] * 0.85
  if obj.any():
    po, io = p[obj], scene_of[obj]
    eps = 1e-3
    taps = np.array([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]],
                    np.float32)
    n = sum(k * scene_sdf(po + eps * k, io)[:, None] for k in taps)
    normal[obj] = _normalize(n + 1e-9)
    albedo[obj] = _object_albedo(_to_local(po, s, io)[0], s, io)
  light = _light_dirs(s, axes)[scene_of]
  diffuse = np.maximum(np.sum(normal * light, -1), 0.0)
  shade = (0.35 + 0.75 * diffuse) * s["exposure"][scene_of]
  rgb = (albedo * shade[:, None]).reshape(b, image_size, image_size, 3)
  # One generator for the batch, seeded by all its scenes (deterministic).
  noise = np.random.default_rng(s["noise_seed"]).normal(
      0, 0.012, rgb.shape).astype(np.float32)
  rgb = np.clip((rgb + noise) * 255.0 + 0.5, 0, 255).astype(np.uint8)
  return rgb, flat.reshape(b, image_size, image_size)


def sensor_artifacts(depth: np.ndarray, rng: np.random.Generator,
                     strength: float = 1.0) -> np.ndarray:
  """Real-sensor depth defects: holes (0) at depth edges, dropouts, noise.

  Structured-light and time-of-flight sensors return no depth in the
  shadow of depth discontinuities and on scattered small patches, and are
  noisier far away. These defects exist only in the depth modality, which
  is what makes depth look unlike any RGB image to a model trained on RGB,
  while the geometry, and so the class, stays readable.

  Args:
    depth: float32 (B, H, W) metres.
    rng: randomness of the defects.
    strength: scales every hole probability; 0 returns depth unchanged.

  Returns:
    float32 (B, H, W); 0 marks a missing measurement.
  """
  if strength <= 0:
    return depth
  b, h, w = depth.shape
  # A discontinuity is where depth departs from the average of its two
  # neighbours (second difference); smooth surfaces such as the receding
  # floor have large first but small second differences.
  pad = np.pad(depth, ((0, 0), (1, 1), (1, 1)), mode="edge")
  lap_h = np.abs(2 * depth - pad[:, 1:-1, :-2] - pad[:, 1:-1, 2:])
  lap_v = np.abs(2 * depth - pad[:, :-2, 1:-1] - pad[:, 2:, 1:-1])
  edge = np.maximum(lap_h, lap_v) > 0.1 * depth
  holes = edge & (rng.random(depth.shape) < min(1.0, 0.7 * strength))
  cell = max(1, h // 16)
  coarse = rng.random((b, -(-h // cell), -(-w // cell))) < 0.06 * strength
  blobs = np.kron(coarse, np.ones((cell, cell), bool))[:, :h, :w]
  noisy = depth * (1 + rng.normal(0, 0.01, depth.shape)).astype(np.float32)
  return np.where(holes | blobs, 0.0, noisy).astype(np.float32)


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def caption(s: dict, i: int, rng: np.random.Generator) -> str:
  """A readable caption of scene i: class name plus nuisance attributes."""
  name = geometry.CLASS_NAMES[s["label"][i]]
  colour = COLOUR_NAMES[s["object_colour"][i]]
  tex = TEXTURES[s["texture"][i]]
  floor = COLOUR_NAMES[s["floor_colour"][i]]
  wall = COLOUR_NAMES[s["wall_colour"][i]]
  pattern = FLOOR_PATTERNS[s["floor_pattern"][i]]
  light = LIGHTS[s["light"][i]]
  look = colour if tex == "plain" else f"{colour} {tex}"
  floor_desc = floor if pattern == "plain" else f"{pattern} {floor}"
  templates = (
      f"{_article(look)} {look} {name} on {_article(floor_desc)} "
      f"{floor_desc} floor, lit from {light}.",
      f"a photo of {_article(name)} {name} in a room with {wall} walls; "
      f"it is {look}.",
      f"{_article(look)} {look} {name}, lit from {light}, in front of "
      f"{_article(wall)} {wall} wall.",
      f"a rendering of {_article(name)} {name} with a {look} surface on a "
      f"{floor_desc} floor.")
  return templates[rng.integers(len(templates))]


def generate(num_examples: int, image_size: int, seed: int | Sequence[int],
             num_classes: int = len(geometry.CLASS_NAMES),
             chunk: int = 1024, depth_holes: float = 0.0):
  """Yields (index, rgb, depth, label, caption) for a whole split, in order.

  Deterministic in (num_examples, image_size, seed). Labels are balanced
  (a shuffled repeat of 0..num_classes-1). Scenes are rendered in chunks of
  `chunk` consecutive examples, grouped by class inside a chunk.
  `depth_holes` > 0 adds sensor artifacts (see `sensor_artifacts`).
  """
  entropy = [int(x) for x in np.atleast_1d(seed)]
  rng = np.random.default_rng(entropy + [0])
  labels = rng.permutation(np.arange(num_examples) % num_classes)
  params = sample_scenes(rng, labels)
  cap_rng = np.random.default_rng(entropy + [1])
  for start in range(0, num_examples, chunk):
    stop = min(start + chunk, num_examples)
    rgb = np.empty((stop - start, image_size, image_size, 3), np.uint8)
    depth = np.empty((stop - start, image_size, image_size), np.float32)
    for c in np.unique(labels[start:stop]):
      rows = start + np.nonzero(labels[start:stop] == c)[0]
      sub = {k: v[rows] for k, v in params.items()}
      rgb[rows - start], depth[rows - start] = render(sub, image_size)
    if depth_holes > 0:
      depth = sensor_artifacts(depth, np.random.default_rng(
          entropy + [2, start]), depth_holes)
    for i in range(start, stop):
      yield (i, rgb[i - start], depth[i - start], int(labels[i]),
             caption(params, i, cap_rng))
