"""Local ScanNet / SUN RGB-D / NYUv2 builders on tiny fake folders."""
import os

import numpy as np
import pytest
from PIL import Image

from edgevl_jax import data


def _img(path, h=12, w=16, depth=False, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  if depth:
    Image.fromarray(rng.integers(400, 5000, (h, w)).astype(np.uint16)).save(
        path)
  else:
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _text(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def fake_scannet(root):
  classes = ["bedroom / hotel", "kitchen", "office", "gym", "misc"]
  ids = {"train": [f"scene{s:04d}_00/{f:05d}" for s in range(10)
                   for f in (0, 100)],
         "valid": ["scene0700_00/00000", "scene0701_00/00100"]}
  for split, lst in ids.items():
    _text(os.path.join(root, f"{split}_every_100th.txt"), "\n".join(lst))
    for k, i in enumerate(lst):
      scene = i.split("/")[0]
      _img(os.path.join(root, split, "rgb", i + ".jpg"), seed=k)
      _img(os.path.join(root, split, "depth", i + ".png"), depth=True)
      _text(os.path.join(root, split, "scene_class", scene + ".txt"),
            classes[int(scene[5:9]) % 5])
  return ids


def test_scannet_layout_labels_and_scene_disjoint_validation(tmp_path):
  root = str(tmp_path / "scannet")
  fake_scannet(root)
  out = str(tmp_path / "tfds")
  train = data.load_split("scannet", "train", data_dir=out, config=root)
  val = data.load_split("scannet", "validation", data_dir=out)
  test = data.load_split("scannet", "test", data_dir=out)
  assert (len(train), len(val), len(test)) == (18, 2, 2)
  names = data.get_info("scannet").class_names
  rec = test[0]
  assert names[rec["label"]] == "bedroom/hotel"  # scene0700 -> classes[0]
  assert rec["rgb"].shape == (12, 16, 3) and rec["other"].dtype == np.uint16
  b = next(iter(data.paired_loader(train, batch_size=4, image_size=16,
                                   train=True, seed=0)))
  assert b["other"].shape == (4, 16, 16, 3)
  raw = train._raw
  train_scenes = {raw[i]["key"].decode().split("/")[0]
                  for i in range(len(raw))}
  val_scenes = {val._raw[i]["key"].decode().split("/")[0]
                for i in range(len(val))}
  assert not train_scenes & val_scenes


def test_scannet_missing_files_are_named(tmp_path):
  root = str(tmp_path / "scannet")
  fake_scannet(root)
  os.remove(os.path.join(root, "train", "depth", "scene0003_00", "00100.png"))
  os.remove(os.path.join(root, "valid_every_100th.txt"))
  with pytest.raises(ValueError, match=r"missing 1 path\(s\): "
                     r"valid_every_100th.txt"):
    data.load_split("scannet", "train", data_dir=str(tmp_path / "o"),
                    config=root)
  _text(os.path.join(root, "valid_every_100th.txt"), "scene0700_00/00000")
  with pytest.raises(ValueError,
                     match="train/depth/scene0003_00/00100.png"):
    data.load_split("scannet", "train", data_dir=str(tmp_path / "o"),
                    config=root)
  assert not os.path.exists(tmp_path / "o" / "scannet")  # nothing half-made
  with pytest.raises(ValueError, match="not prepared .* pass the folder"):
    data.load_split("scannet", "train", data_dir=str(tmp_path / "o"))
  with pytest.raises(ValueError, match="scannet split 'val' unknown"):
    data.load_split("scannet", "val", data_dir=str(tmp_path / "o"))


def test_sun_rgbd_classes_from_file_names(tmp_path):
  root = str(tmp_path / "sun")
  names = ["bathroom", "computer_room", "study_space", "kitchen"]
  for split, n in (("train", 12), ("test", 4)):
    for k in range(n):
      stem = f"{names[k % 4]}__{k:06d}"
      _img(os.path.join(root, split, "rgb", stem + ".jpg"), seed=k)
      _img(os.path.join(root, split, "depth", stem + ".png"), depth=True)
  out = str(tmp_path / "tfds")
  test = data.load_split("sun_rgbd", "test", data_dir=out, config=root)
  info = data.get_info("sun_rgbd")
  got = sorted(info.class_names[test[i]["label"]] for i in range(4))
  assert got == ["bathroom", "computer room", "kitchen", "study space"]
  assert len(data.load_split("sun_rgbd", "train", data_dir=out)) + len(
      data.load_split("sun_rgbd", "validation", data_dir=out)) == 12
  os.remove(os.path.join(root, "test", "depth", "kitchen__000003.png"))
  with pytest.raises(ValueError, match="test/depth/kitchen__000003.png"):
    data.load_split("sun_rgbd", "test", data_dir=str(tmp_path / "o2"),
                    config=root)


def test_nyuv2_ids_and_label_aliases(tmp_path):
  root = str(tmp_path / "nyu")
  labels = ["living_room", "excercise_room", "bedroom", "kitchen"]
  for split, ids in (("train", range(1, 11)), ("test", range(20, 24))):
    _text(os.path.join(root, f"{split}.txt"),
          "\n".join(str(i) for i in ids))
    for i in ids:
      _img(os.path.join(root, split, "rgb", f"{i:04d}.png"), seed=i)
      _img(os.path.join(root, split, "depth", f"{i:04d}.png"), depth=True)
      _text(os.path.join(root, split, "scene_class", f"{i:04d}.txt"),
            labels[i % 4])
  test = data.load_split("nyuv2", "test", data_dir=str(tmp_path / "t"),
                         config=root)
  names = data.get_info("nyuv2").class_names
  assert [names[test[i]["label"]] for i in range(4)] == [
      "living room", "exercise room", "bedroom", "kitchen"]
  _text(os.path.join(root, "test", "scene_class", "0021.txt"), "spaceship")
  with pytest.raises(ValueError, match="unknown nyuv2 scene class "
                     "'spaceship'"):
    data.load_split("nyuv2", "test", data_dir=str(tmp_path / "t2"),
                    config=root)


def test_mismatched_pair_sizes_are_named(tmp_path):
  root = str(tmp_path / "sun")
  for split in ("train", "test"):
    for k in range(2):
      stem = f"office__{k:06d}"
      _img(os.path.join(root, split, "rgb", stem + ".jpg"), h=10, w=14)
      _img(os.path.join(root, split, "depth", stem + ".png"), depth=True)
  # Found when preparing (every pair is decoded then), not at first read.
  with pytest.raises(ValueError, match=r"test record 'office__000000': image "
                     r"sizes differ: rgb test/rgb/office__000000.jpg is "
                     r"10x14 but depth test/depth/office__000000.png is 12x16"):
    data.load_split("sun_rgbd", "test", data_dir=str(tmp_path / "t"),
                    config=root)


def _scannet_at_sensor_resolution(root, rgb_hw=(968, 1296)):
  """3 frames: colour JPEGs at ScanNet's 1296 x 968, depth 640 x 480 uint16.

  Two train scenes (one is carved off for validation) and one valid frame.
  """
  ids = {"train": ["scene0000_00/00000", "scene0001_00/00100"],
         "valid": ["scene0700_00/00000"]}
  h, w = rgb_hw
  yy, xx = np.mgrid[0:h, 0:w]
  for split, lst in ids.items():
    _text(os.path.join(root, f"{split}_every_100th.txt"), "\n".join(lst))
    for k, i in enumerate(lst):
      # Smooth (small JPEG) but not constant, so resamplers differ.
      rgb = np.stack([xx * 255 // w, yy * 255 // h,
                      (xx // 7 + yy // 5 + 40 * k) % 256], -1)
      path = os.path.join(root, split, "rgb", i + ".jpg")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(rgb.astype(np.uint8)).save(path, quality=90)
      _img(os.path.join(root, split, "depth", i + ".png"), h=480, w=640,
           depth=True, seed=k)
      _text(os.path.join(root, split, "scene_class",
                         i.split("/")[0] + ".txt"), "kitchen")
  return ids


def test_scannet_rgb_is_resized_to_the_depth_size(tmp_path):
  root = str(tmp_path / "scannet")
  ids = _scannet_at_sensor_resolution(root)
  out = str(tmp_path / "tfds")
  test = data.load_split("scannet", "test", data_dir=out, config=root)
  rec = test[0]
  assert rec["rgb"].shape == (480, 640, 3) and rec["rgb"].dtype == np.uint8
  assert rec["other"].shape == (480, 640) and rec["other"].dtype == np.uint16
  original = Image.open(os.path.join(root, "valid", "rgb",
                                     ids["valid"][0] + ".jpg")).convert("RGB")
  assert original.size == (1296, 968)
  expected = {m: np.asarray(original.resize((640, 480), f))
              for m, f in (("area", Image.Resampling.BOX),
                           ("nearest", Image.Resampling.NEAREST))}
  np.testing.assert_array_equal(rec["rgb"], expected["area"])  # default
  nearest = data.load_split("scannet", "test", data_dir=out,
                            rgb_resample="nearest")[0]["rgb"]
  np.testing.assert_array_equal(nearest, expected["nearest"])
  assert not np.array_equal(nearest, rec["rgb"])
  b = next(iter(data.paired_loader(test, batch_size=1, image_size=32,
                                   train=False)))
  assert b["rgb"].shape == b["other"].shape == (1, 32, 32, 3)
  with pytest.raises(ValueError, match=r"rgb_resample='cubic'; expected one "
                     r"of \['area', 'bilinear', 'nearest'\]"):
    data.load_split("scannet", "test", data_dir=out, rgb_resample="cubic")


def test_scannet_pair_of_another_aspect_ratio_is_named(tmp_path):
  root = str(tmp_path / "scannet")
  _scannet_at_sensor_resolution(root, rgb_hw=(600, 1296))
  with pytest.raises(ValueError, match=r"'scene0700_00/00000': aspect ratios "
                     r"differ: rgb valid/rgb/scene0700_00/00000.jpg is "
                     r"600x1296 but depth .* is 480x640"):
    data.load_split("scannet", "test", data_dir=str(tmp_path / "t"),
                    config=root)
