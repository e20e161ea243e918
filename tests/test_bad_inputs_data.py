"""Bad depth images and local datasets: corrected values or named errors.

NaN/inf depth pixels are holes (0) instead of zeroing the whole image; a
colour-mapped 3-channel depth is refused; a prepared copy whose source
folder changed is refused (or re-prepared on request); truncated images and
non-numeric ids are named at preparation time.
"""
import os
import time

import numpy as np
import pytest
from PIL import Image

from edgevl_jax import data
from edgevl_jax.data import local_rgbd
from edgevl_jax.data import transforms
from edgevl_jax.models import preprocess


# ----- item 4: non-finite depth pixels are holes -----------------------------
def test_nan_and_inf_depth_pixels_become_holes():
  depth = np.array([[1.0, 2.0, np.nan], [3.0, np.inf, 5.0]], np.float32)
  unit = transforms.other_to_unit(depth, "depth")
  np.testing.assert_allclose(unit, [[0.0, 0.25, 0.0], [0.5, 0.0, 1.0]])
  assert unit.dtype == np.float32
  # Before the fix the NaN made min/max NaN and the whole image 0.
  assert unit.max() == 1.0
  for hopeless in (np.full((2, 3), np.nan, np.float32),
                   np.array([[np.inf, -np.inf]], np.float32),
                   np.full((2, 2), 7.0, np.float32)):
    np.testing.assert_array_equal(transforms.other_to_unit(hopeless, "depth"),
                                  np.zeros(hopeless.shape, np.float32))
  swir = transforms.other_to_unit(np.array([[4095.0, np.nan]]), "swir")
  np.testing.assert_array_equal(swir, [[1.0, 0.0]])
  # Finite images are unchanged, bit for bit, from a plain min-max.
  x = np.random.default_rng(0).uniform(300, 5000, (5, 7)).astype(np.float32)
  lo, hi = float(x.min()), float(x.max())
  np.testing.assert_array_equal(preprocess.min_max_unit(x),
                                (x - lo) / (hi - lo))


def test_float_tiff_depth_with_holes_through_the_pair_transform(tmp_path):
  depth = np.random.default_rng(1).uniform(0.5, 4.0, (12, 16)).astype(
      np.float32)
  depth[:4, :4] = np.nan  # sensor dropout
  path = tmp_path / "d.tiff"
  Image.fromarray(depth, mode="F").save(path)
  read = np.asarray(Image.open(path))
  rec = {"rgb": np.zeros((12, 16, 3), np.uint8), "other": read, "label": 0,
         "index": 0}
  out = transforms.transform_pair(rec, image_size=16, modality="depth")
  other = out["other"][..., 0]
  assert np.isfinite(other).all()
  assert other.max() == pytest.approx(1.0) and other[8:, 8:].std() > 0.1


# ----- item 5: colour-mapped depth is refused --------------------------------
def test_three_different_depth_channels_are_refused():
  gray = np.random.default_rng(2).integers(0, 255, (4, 5), dtype=np.uint8)
  same = np.repeat(gray[..., None], 3, -1)
  np.testing.assert_array_equal(transforms.other_to_unit(same, "depth"),
                                transforms.other_to_unit(gray, "depth"))
  colour = same.copy()
  colour[..., 1] = 255 - colour[..., 0]
  with pytest.raises(ValueError, match=r"record index 3: depth image has 3 "
                     r"channels that differ \(\d+ of 20 pixels\), e.g. a "
                     r"colour-mapped visualisation; depth must be one "
                     r"channel \(or three equal channels\)"):
    transforms.transform_pair({"rgb": np.zeros((4, 5, 3), np.uint8),
                               "other": colour, "label": 0, "index": 3},
                              image_size=4, modality="depth")


def _img(path, h=12, w=16, depth=False, seed=0, colour_depth=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  if colour_depth:
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
  elif depth:
    Image.fromarray(rng.integers(400, 5000, (h, w)).astype(np.uint16)).save(
        path)
  else:
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _text(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def fake_nyuv2(root, train=range(1, 9), test=range(20, 23)):
  for split, ids in (("train", train), ("test", test)):
    _text(os.path.join(root, f"{split}.txt"), "\n".join(str(i) for i in ids))
    for i in ids:
      _img(os.path.join(root, split, "rgb", f"{i:04d}.png"), seed=i)
      _img(os.path.join(root, split, "depth", f"{i:04d}.png"), depth=True)
      _text(os.path.join(root, split, "scene_class", f"{i:04d}.txt"),
            "kitchen")


def test_colour_mapped_depth_file_named_at_preparation(tmp_path):
  root = str(tmp_path / "nyu")
  fake_nyuv2(root)
  _img(os.path.join(root, "test", "depth", "0021.png"), colour_depth=True)
  with pytest.raises(ValueError, match=r"nyuv2: 1 bad record\(s\) in the "
                     r"local copy .*: test record '0021': test/depth/0021.png: "
                     r"depth image has 3 channels that differ"):
    data.load_split("nyuv2", "test", data_dir=str(tmp_path / "t"),
                    config=root)
  assert not os.path.exists(tmp_path / "t" / "nyuv2")  # nothing half-made


# ----- item 7: bad records named at preparation time -------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "folder"])
def test_bad_image_files_named_at_preparation(tmp_path, damage):
  root = str(tmp_path / "nyu")
  fake_nyuv2(root)
  path = os.path.join(root, "train", "rgb", "0005.png")
  if damage == "truncated":
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:len(blob) // 2])
  elif damage == "empty":
    open(path, "wb").close()
  elif damage == "text":
    open(path, "w").write("<html>not found</html>")
  else:
    os.remove(path)
    os.makedirs(path)
  want = {"truncated": r"is not a readable image \(truncated or not an image",
          "empty": r"is empty \(0 bytes\)",
          "text": r"is not a readable image \(truncated or not an image",
          "folder": "is not a readable image"}[damage]
  with pytest.raises(ValueError, match=r"(train|validation) record '0005': "
                     rf"rgb file train/rgb/0005.png {want}"):
    data.load_split("nyuv2", "train", data_dir=str(tmp_path / "t"),
                    config=root)
  assert not os.path.exists(tmp_path / "t" / "nyuv2")


def test_non_numeric_ids_are_named(tmp_path):
  root = str(tmp_path / "nyu")
  fake_nyuv2(root)
  _text(os.path.join(root, "test.txt"), "20\n21a\n\n22\nx")
  with pytest.raises(ValueError, match=rf"nyuv2: '{root}/test.txt' has 2 "
                     r"id\(s\) that are not integer image numbers \(e.g. '12'\)"
                     r": line 2: '21a', line 5: 'x'"):
    data.load_split("nyuv2", "test", data_dir=str(tmp_path / "t"),
                    config=root)
  scannet = str(tmp_path / "scannet")
  _text(os.path.join(scannet, "train_every_100th.txt"),
        "scene0000_00/00100\nscene0000_00/last")
  _text(os.path.join(scannet, "valid_every_100th.txt"), "scene0700_00/00000")
  with pytest.raises(ValueError, match=r"train_every_100th.txt' has 1 id\(s\) "
                     r"that are not '<scene>/<frame number>'.*line 2: "
                     r"'scene0000_00/last'"):
    data.load_split("scannet", "train", data_dir=str(tmp_path / "t"),
                    config=scannet)


def test_empty_label_file_is_named(tmp_path):
  root = str(tmp_path / "nyu")
  fake_nyuv2(root)
  _text(os.path.join(root, "test", "scene_class", "0022.txt"), "\n")
  with pytest.raises(ValueError, match=r"label file .*0022.txt' is empty"):
    data.load_split("nyuv2", "test", data_dir=str(tmp_path / "t"),
                    config=root)


# ----- item 6: a prepared copy remembers its source --------------------------
def test_changed_source_is_refused_then_reprepared(tmp_path):
  root = str(tmp_path / "nyu")
  out = str(tmp_path / "tfds")
  fake_nyuv2(root)
  test = data.load_split("nyuv2", "test", data_dir=out, config=root)
  assert len(test) == 3
  prepared = os.path.join(out, "nyuv2", "1.0.0")
  record = os.path.join(prepared, local_rgbd.SOURCE_RECORD)
  assert os.path.isfile(record)
  # Same source: accepted; no source given: accepted (nothing to compare).
  assert len(data.load_split("nyuv2", "test", data_dir=out, config=root)) == 3
  assert len(data.load_split("nyuv2", "train", data_dir=out)) > 0
  # The user adds a test image: the old copy would silently miss it.
  _img(os.path.join(root, "test", "rgb", "0023.png"), seed=23)
  _img(os.path.join(root, "test", "depth", "0023.png"), depth=True)
  _text(os.path.join(root, "test", "scene_class", "0023.txt"), "bedroom")
  _text(os.path.join(root, "test.txt"), "20\n21\n22\n23")
  with pytest.raises(ValueError) as e:
    data.load_split("nyuv2", "test", data_dir=out, config=root)
  msg = str(e.value)
  assert msg.startswith(f"nyuv2: the prepared copy in '{prepared}' was made "
                        f"from '{root}' (")
  assert f"but the source folder '{root}' now lists" in msg
  assert "fingerprint sha256:" in msg
  assert (f"Re-prepare: delete '{prepared}', or pass "
          "on_source_change='reprepare'") in msg
  test = data.load_split("nyuv2", "test", data_dir=out, config=root,
                         on_source_change="reprepare")
  assert len(test) == 4
  # The re-prepared copy is recorded: no complaint any more.
  assert len(data.load_split("nyuv2", "test", data_dir=out, config=root)) == 4
  # Touching a file (re-export) also counts as a change.
  later = time.time() + 10
  os.utime(os.path.join(root, "test", "depth", "0020.png"), (later, later))
  with pytest.raises(ValueError, match="prepared copy is stale"):
    data.load_split("nyuv2", "test", data_dir=out, config=root)
  with pytest.raises(ValueError, match=r"source folder '/nonexistent' does "
                     r"not exist, so the prepared copy in .* cannot be "
                     "checked"):
    data.load_split("nyuv2", "test", data_dir=out, config="/nonexistent")
  with pytest.raises(ValueError, match="on_source_change='maybe'"):
    data.load_split("nyuv2", "test", data_dir=out, config=root,
                    on_source_change="maybe")


def test_prepared_copy_without_record_is_refused(tmp_path):
  root = str(tmp_path / "nyu")
  out = str(tmp_path / "tfds")
  fake_nyuv2(root)
  data.load_split("nyuv2", "test", data_dir=out, config=root)
  prepared = os.path.join(out, "nyuv2", "1.0.0")
  os.remove(os.path.join(prepared, local_rgbd.SOURCE_RECORD))
  with pytest.raises(ValueError, match=rf"has no {local_rgbd.SOURCE_RECORD} "
                     r"\(it was prepared by an older edgevl_jax"):
    data.load_split("nyuv2", "test", data_dir=out, config=root)


def test_same_files_at_another_path_are_accepted(tmp_path):
  root = str(tmp_path / "nyu")
  out = str(tmp_path / "tfds")
  fake_nyuv2(root)
  data.load_split("nyuv2", "test", data_dir=out, config=root)
  moved = str(tmp_path / "moved")
  os.rename(root, moved)  # rename keeps sizes and mtimes
  assert len(data.load_split("nyuv2", "test", data_dir=out,
                             config=moved)) == 3
