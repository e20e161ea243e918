"""Synthetic RGB-D dataset: TF-free preparation, determinism, geometry."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgevl_jax import data
from edgevl_jax.data.synthetic_rgbd import geometry
from edgevl_jax.data.synthetic_rgbd import make_config
from edgevl_jax.data.synthetic_rgbd import render


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  data.load_split("synthetic_rgbd", "train", data_dir=str(d), config="tiny")
  return str(d)


def test_prepares_and_reads_without_tensorflow(tmp_path):
  # TensorFlow made to look uninstalled (find_spec says None, importing
  # raises) even where it is installed: preparing and loading must work.
  script = textwrap.dedent(f"""
      import importlib.abc, importlib.util, sys
      def is_tf(name):
        return name == 'tensorflow' or name.startswith('tensorflow.')
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if is_tf(name):
            raise ModuleNotFoundError('blocked: ' + name)
          return None
      real_find_spec = importlib.util.find_spec
      importlib.util.find_spec = (
          lambda name, *a: None if is_tf(name) else real_find_spec(name, *a))
      sys.meta_path.insert(0, Block())
      from edgevl_jax import data
      cfg = data.synthetic_rgbd.make_config(image_size=12, num_train=30,
          num_validation=6, num_test=6, seed=3)
      src = data.load_split('synthetic_rgbd', 'train', data_dir={str(tmp_path)!r},
                            config=cfg)
      b = next(iter(data.paired_loader(src, batch_size=5, image_size=16,
                                       train=True, seed=0)))
      assert 'tensorflow' not in sys.modules
      print(len(src), b['rgb'].shape, b['other'].shape)
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "30 (5, 16, 16, 3) (5, 16, 16, 3)" in out.stdout


def test_splits_sizes_fields_and_readable_captions(tiny_dir):
  sizes = {"train": 120, "validation": 24, "test": 48}
  info = data.get_info("synthetic_rgbd")
  assert info.num_classes >= 10 and info.other_modality == "depth"
  assert set(info.class_names) < set(info.superset_vocabulary)
  for split, n in sizes.items():
    src = data.load_split("synthetic_rgbd", split, data_dir=tiny_dir,
                          config="tiny")
    assert len(src) == n
  rec = src[7]
  assert rec["rgb"].shape == (16, 16, 3) and rec["rgb"].dtype == np.uint8
  assert rec["other"].shape == (16, 16) and rec["other"].dtype == np.uint16
  assert rec["index"] == 7
  assert info.class_names[rec["label"]] in rec["caption"]
  assert rec["caption"].isascii() and rec["caption"].endswith(".")


def test_generation_is_deterministic_in_the_seed():
  a = list(render.generate(30, 16, seed=(5, 0), depth_holes=1.0))
  b = list(render.generate(30, 16, seed=(5, 0), depth_holes=1.0))
  c = list(render.generate(30, 16, seed=(6, 0), depth_holes=1.0))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x[1], y[1])
    np.testing.assert_array_equal(x[2], y[2])
    assert x[3:] == y[3:]
  assert any(not np.array_equal(x[1], z[1]) for x, z in zip(a, c))
  holes = np.mean([np.mean(x[2] == 0) for x in a])
  assert 0.01 < holes < 0.4  # sensor-like holes, not an erased image


def test_sensor_holes_sit_on_depth_edges_not_on_smooth_floor():
  s = render.sample_scenes(np.random.default_rng(1), np.full(8, 1))
  _, depth = render.render(s, 32)
  out = render.sensor_artifacts(depth, np.random.default_rng(0), 1.0)
  assert np.array_equal(render.sensor_artifacts(depth, None, 0.0), depth)
  floor_rows = out[:, -6:]  # near floor: smooth, only patch dropouts
  assert np.mean(floor_rows == 0) < 0.15
  far_jump = np.abs(np.diff(depth, axis=2)) > 0.5  # object silhouettes
  edge_px = np.zeros_like(depth, bool)
  edge_px[:, :, 1:] |= far_jump
  assert np.mean(out[edge_px] == 0) > 0.4


def test_depth_is_aligned_with_rgb_object_silhouette():
  # The object's pixels are nearer than the floor behind them in depth and
  # differ from the background colour in RGB: same rays, same scene.
  labels = np.zeros(6, np.int64)  # spheres, centred in view
  s = render.sample_scenes(np.random.default_rng(0), labels)
  rgb, depth = render.render(s, 32)
  centre = depth[:, 14:18, 14:18].mean((1, 2))
  corner_bottom = depth[:, -2:, :2].mean((1, 2))
  assert np.all(centre > 0) and np.all(np.isfinite(depth))
  # The camera looks at the sphere, so the image centre is the sphere, whose
  # surface is further than the floor at the bottom edge but in front of the
  # floor behind it (top half of the image).
  top = depth[:, :4].mean((1, 2))
  assert np.all(centre < top)
  assert np.all(corner_bottom < top)
  assert rgb.shape == (6, 32, 32, 3) and rgb.dtype == np.uint8


def _split_arrays(n, size, seed, holes=0.0):
  out = list(render.generate(n, size, seed=seed, depth_holes=holes))
  depth = np.stack([o[2] for o in out])
  labels = np.array([o[3] for o in out])
  rgb = np.stack([o[1] for o in out])
  return rgb, depth, labels


def _unit(x):
  x = x.reshape(len(x), -1).astype(np.float64)
  lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
  return (x - lo) / np.maximum(hi - lo, 1e-9)


def test_class_lives_in_geometry_nearest_centroid_probe_on_depth():
  # Per-image min-max depth at 16 x 16 as the pipeline sees it; nearest
  # class centroid fitted on one seed, scored on another. Chance = 1/12.
  _, d_tr, y_tr = _split_arrays(600, 16, (11, 0))
  _, d_te, y_te = _split_arrays(240, 16, (11, 2))
  x_tr, x_te = _unit(d_tr), _unit(d_te)
  k = len(geometry.CLASS_NAMES)
  centroids = np.stack([x_tr[y_tr == c].mean(0) for c in range(k)])
  dist = ((x_te[:, None] - centroids[None]) ** 2).sum(-1)
  acc = float(np.mean(dist.argmin(1) == y_te))
  # The same probe on RGB pixels: colour is a nuisance, so it is weaker.
  r_tr = _unit(_split_arrays(600, 16, (11, 0))[0])
  r_te = _unit(_split_arrays(240, 16, (11, 2))[0])
  rc = np.stack([r_tr[y_tr == c].mean(0) for c in range(k)])
  acc_rgb = float(np.mean(
      ((r_te[:, None] - rc[None]) ** 2).sum(-1).argmin(1) == y_te))
  print(f"nearest-centroid probe: depth {acc:.3f}, rgb {acc_rgb:.3f} "
        f"(chance {1 / k:.3f})")
  assert acc > 3.0 / k
  assert acc > acc_rgb + 0.1
  # With the default sensor holes the class is still in the depth geometry.
  _, h_tr, _ = _split_arrays(600, 16, (11, 0), holes=1.0)
  _, h_te, _ = _split_arrays(240, 16, (11, 2), holes=1.0)
  h_tr, h_te = _unit(h_tr), _unit(h_te)
  hc = np.stack([h_tr[y_tr == c].mean(0) for c in range(k)])
  acc_holes = float(np.mean(
      ((h_te[:, None] - hc[None]) ** 2).sum(-1).argmin(1) == y_te))
  print(f"nearest-centroid probe on depth with holes: {acc_holes:.3f}")
  assert acc_holes > 3.0 / k
  # Per-class statistic: fraction of near pixels (object area) differs.
  near = (x_tr < 0.35).mean(1)
  per_class = np.array([near[y_tr == c].mean() for c in range(k)])
  assert per_class.max() - per_class.min() > 0.05


def test_unknown_config_and_empty_split_are_named(tmp_path):
  with pytest.raises(ValueError, match="Unknown synthetic_rgbd config 'huge'"):
    data.load_split("synthetic_rgbd", "train", data_dir="/nonexistent",
                    config="huge")
  cfg = make_config(image_size=8, num_train=4, num_validation=0, num_test=2)
  with pytest.raises(ValueError, match="'validation' has 0 examples"):
    builder = data.sources.synthetic_builder(str(tmp_path), cfg)
    builder.download_and_prepare()


def test_unknown_dataset_name_is_named():
  with pytest.raises(ValueError, match="Unknown dataset name 'imagenet'"):
    data.get_info("imagenet")
  with pytest.raises(ValueError, match="Unknown dataset name 'imagenet'"):
    data.load_split("imagenet", "train", data_dir="/tmp")
