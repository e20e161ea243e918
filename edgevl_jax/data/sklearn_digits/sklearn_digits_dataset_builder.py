"""TFDS builder over scikit-learn's `load_digits` (no download, no TensorFlow).

The 1797 8 x 8 grey digits (values 0..16, UCI optical recognition of
handwritten digits, bundled with scikit-learn) are scaled to 0..255,
bilinearly upsampled to 32 x 32 and repeated to 3 channels, so CIFAR-style
32 px networks run on a small REAL dataset on a CPU. The train/test split is
stratified and deterministic (scikit-learn `train_test_split`, fixed seed,
20 % test). Tensors are stored raw in array_record files, which
`tfds.data_source` reads without TensorFlow.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from sklearn import datasets
from sklearn import model_selection
import tensorflow_datasets as tfds

from edgevl_jax.data import tfds_builder

IMAGE_SIZE = 32
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_RAW = tfds.features.Encoding.BYTES


def _split_indices() -> dict[str, np.ndarray]:
  """Stratified, deterministic train/test indices into `load_digits`."""
  labels = datasets.load_digits().target
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels,
      random_state=SPLIT_SEED)
  return {"train": np.sort(train), "test": np.sort(test)}


def _to_rgb32(image8: np.ndarray) -> np.ndarray:
  """(8, 8) float in [0, 16] -> (32, 32, 3) uint8, bilinear upsampling."""
  grey = Image.fromarray(
      np.clip(image8 * (255.0 / 16.0), 0, 255).astype(np.uint8))
  up = np.asarray(grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
  return np.repeat(up[:, :, None], 3, axis=2)


class Builder(tfds_builder.OwnCodePath,
              tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits, upsampled to 32 x 32 x 3."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "8x8 digits upsampled to 32x32x3, 80/20 split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                encoding=_RAW),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "index": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    return {name: self._generate_examples(idx)
            for name, idx in _split_indices().items()}

  def _generate_examples(self, indices: np.ndarray):
    digits = datasets.load_digits()
    for i in indices:
      yield int(i), {"image": _to_rgb32(digits.images[i]),
                     "label": int(digits.target[i]), "index": int(i)}


@dataclasses.dataclass(frozen=True)
class Split:
  """A whole split in memory (the dataset is 1797 images, 5.5 MB).

  Attributes:
    images: (N, 32, 32, 3) uint8.
    labels: (N,) int32.
  """
  images: np.ndarray
  labels: np.ndarray


def load(split: str, *, data_dir: str) -> Split:
  """Prepares the dataset under `data_dir` if needed and reads `split`.

  Args:
    split: 'train' or 'test'.
    data_dir: TFDS data directory.
  """
  if split not in ("train", "test"):
    raise ValueError(f"sklearn_digits has splits 'train' and 'test'; found "
                     f"split={split!r}.")
  builder = Builder(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  source = builder.as_data_source()[split]
  records = [source[i] for i in range(len(source))]
  return Split(np.stack([r["image"] for r in records]).astype(np.uint8),
               np.asarray([r["label"] for r in records], np.int32))
