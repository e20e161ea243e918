"""EuroSAT RGB + SWIR pairs on tfds.testing.mock_data."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from edgevl_jax import data
from edgevl_jax.data import eurosat
from edgevl_jax.data import info as info_lib
from edgevl_jax.data import transforms


@pytest.fixture()
def mocked(tmp_path):
  with tfds.testing.mock_data(num_examples=60):
    yield str(tmp_path)


def test_class_disjoint_splits_cover_all_ten_prompts(mocked):
  info = data.get_info("eurosat")
  assert len(info.prompts()) == 10 and info.other_modality == "swir"
  assert info.prompts()[0] == "a satellite image of an annual crop"
  splits = {s: data.load_split("eurosat", s, data_dir=mocked)
            for s in ("train", "validation", "test")}
  labels = {s: {src[i]["label"] for i in range(len(src))}
            for s, src in splits.items()}
  assert labels["train"] <= set(info.train_class_ids)
  assert labels["validation"] <= set(info.train_class_ids)
  assert labels["test"] <= set(info.test_class_ids)
  assert not set(info.train_class_ids) & set(info.test_class_ids)
  assert sum(len(s) for s in splits.values()) == 60
  train_idx = {int(p) for p in splits["train"]._positions}
  assert not train_idx & {int(p) for p in splits["validation"]._positions}


def test_paper_class_split_follows_the_reference_recipe():
  info = data.get_info("eurosat")
  assert info.train_class_ids == (1, 2, 4, 8, 9)
  assert info.test_class_ids == (0, 3, 5, 6, 7)
  # Derived in code from the reference's numpy draw, not typed in.
  np.random.seed(0)
  order = np.random.choice(10, 10, replace=False)
  assert info.train_class_ids == tuple(sorted(order[:5].tolist()))
  assert info_lib.reference_class_split() == (info.train_class_ids,
                                              info.test_class_ids)
  names = [info.class_names[i] for i in info.test_class_ids]
  assert names == ["annual crop", "highway", "pasture", "permanent crop",
                   "residential"]


def test_band_order_rgb_is_b4_b3_b2_and_swir_is_b12_not_b8a():
  # Band k of the 13 holds the distinct constant 250 * (k + 1) (all below
  # both scales), so each output names the band it came from. Order of
  # the all-bands files: B01..B12, then B8A (index 12, near infrared).
  bands = np.ones((4, 4, 13), np.float32) * (250.0 * np.arange(1, 14))
  rec = eurosat._convert({"sentinel2": bands, "label": 4}, 0)
  # RGB = indices 3, 2, 1 (B4, B3, B2) / 3000: 1000, 750, 500.
  assert rec["rgb"][0, 0].tolist() == [85, 64, 43]
  # SWIR = index 11 (B12) = 3000, not index 12 (B8A) = 3250.
  np.testing.assert_array_equal(rec["other"], 3000.0)
  np.testing.assert_allclose(transforms.other_to_unit(rec["other"], "swir"),
                             3000.0 / 4095.0, rtol=1e-6)
  assert eurosat.BAND_NAMES[eurosat.SWIR_BAND] == "B12"
  # value / 4095, clipped to [0, 1].
  bands[..., 11] = np.linspace(0, 8190, 16).reshape(4, 4)
  swir = transforms.other_to_unit(
      eurosat._convert({"sentinel2": bands, "label": 4}, 0)["other"], "swir")
  np.testing.assert_allclose(swir.reshape(-1)[:3], [0, 546 / 4095,
                                                    1092 / 4095], atol=1e-6)
  assert swir.max() == 1.0  # 8190 / 4095 clipped


def test_loader_yields_swir_pairs(mocked):
  src = data.load_split("eurosat", "train", data_dir=mocked)
  b = next(iter(data.paired_loader(src, batch_size=4, image_size=32,
                                   train=True, seed=0, crop_scale=(0.5, 1.0))))
  assert b["rgb"].shape == b["other"].shape == (4, 32, 32, 3)
  assert np.all(np.isin(b["label"], data.get_info("eurosat").train_class_ids))


def test_wrong_band_count_and_split_are_named(mocked):
  with pytest.raises(ValueError, match=r"expected 'sentinel2' of shape "
                     r"\(H, W, 13\).*got \(4, 4, 3\)"):
    eurosat._convert({"sentinel2": np.zeros((4, 4, 3)), "label": 0}, 0)
  with pytest.raises(ValueError, match="EuroSAT split 'val' unknown"):
    data.load_split("eurosat", "val", data_dir=mocked)
