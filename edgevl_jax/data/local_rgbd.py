"""TFDS builders for local RGB-D scene datasets, and their loading.

The user downloads ScanNet / SUN RGB-D / NYUv2 themselves (licences forbid
redistribution) and points the builder at the folder (TFDS 'manual_dir').
The layout is validated first (local_layouts.py names every missing file),
then each pair is stored as its original encoded files (JPEG/PNG bytes) in
array_record, so preparing is a copy and reading needs only PIL, no
TensorFlow. Depth PNGs keep their integer values (uint16 millimetres for
ScanNet and NYUv2); min-max scaling happens in the pipeline.
"""
import io
import os

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from edgevl_jax.data import info as info_lib
from edgevl_jax.data import local_layouts
from edgevl_jax.data import sources


class LocalRgbdBuilder(tfds.core.GeneratorBasedBuilder):
  """Base builder; subclasses set DATASET (a key of local_layouts.SCANNERS)."""

  DATASET = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded RGB and depth files of a local copy."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the dataset yourself and pass its folder as manual_dir "
      "(edgevl_jax.data.load_split(name, split, data_dir=..., "
      "config=FOLDER)); the layout is described in "
      "edgevl_jax/data/local_layouts.py.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS resolves this through importlib_resources, which it does not
    # install; the file path is all it needs.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    names = info_lib.get_info(self.DATASET).class_names
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DATASET} RGB-D pairs from a local copy.",
        features=tfds.features.FeaturesDict({
            "rgb_file": tfds.features.Tensor(shape=(), dtype=np.object_),
            "depth_file": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.ClassLabel(names=names),
            "key": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int32),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    samples = local_layouts.SCANNERS[self.DATASET](os.fspath(
        dl_manager.manual_dir))
    for split, items in samples.items():
      if not items:
        raise ValueError(f"{self.DATASET}: split {split!r} would be empty; "
                         "the local copy needs examples in every split.")
    return {split: self._generate_examples(items)
            for split, items in samples.items()}

  def _generate_examples(self, items):
    for i, s in enumerate(items):
      with open(s.rgb_path, "rb") as f:
        rgb = f.read()
      with open(s.depth_path, "rb") as f:
        depth = f.read()
      yield i, {"rgb_file": rgb, "depth_file": depth, "label": s.label,
                "key": s.key, "index": i}


def _decode(raw, index: int):
  rgb = np.asarray(Image.open(io.BytesIO(raw["rgb_file"])).convert("RGB"))
  depth = np.asarray(Image.open(io.BytesIO(raw["depth_file"])))
  if depth.ndim == 3:  # some exports save depth as 3 equal channels
    depth = depth[..., 0]
  return {"rgb": rgb, "other": depth, "label": int(raw["label"]),
          "index": index}


def builder(name: str, data_dir: str) -> LocalRgbdBuilder:
  """The TFDS builder of local dataset `name` writing under data_dir."""
  from edgevl_jax.data.nyuv2 import nyuv2_dataset_builder as nyu  # pylint: disable=g-import-not-at-top
  from edgevl_jax.data.scannet import scannet_dataset_builder as scn  # pylint: disable=g-import-not-at-top
  from edgevl_jax.data.sun_rgbd import sun_rgbd_dataset_builder as sun  # pylint: disable=g-import-not-at-top
  classes = {"scannet": scn.Builder, "sun_rgbd": sun.Builder,
             "nyuv2": nyu.Builder}
  if name not in classes:
    raise ValueError(f"No local RGB-D builder {name!r}; expected one of "
                     f"{sorted(classes)}.")
  return classes[name](data_dir=data_dir, file_format="array_record")


def load_split(name: str, split: str, *, data_dir: str,
               source_dir: str | None = None) -> sources.PairedSource:
  """PairedSource of a local dataset, preparing from source_dir if needed."""
  if split not in local_layouts.SPLITS:
    raise ValueError(f"{name} split {split!r} unknown; expected one of "
                     f"{local_layouts.SPLITS}.")
  b = builder(name, data_dir)
  if not b.is_prepared():
    if source_dir is None:
      raise ValueError(
          f"{name} is not prepared under data_dir={data_dir!r}; pass the "
          "folder of your local copy as config=FOLDER to prepare it.")
    # Validate before TFDS creates any output folder.
    local_layouts.SCANNERS[name](os.fspath(source_dir))
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(source_dir)))
  return sources.PairedSource(b.as_data_source()[split], _decode,
                              info=info_lib.get_info(name), split=split)
