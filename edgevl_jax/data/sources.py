"""Dataset name -> random-access source of one split (`load_split`).

The one place that knows every dataset: it imports the builders and the
per-dataset loaders, and none of them imports it back (the record format
they share lives in records.py), so the package has no import cycle.
Every source yields the standard records described in records.py.
"""
import re
from typing import Any

from edgevl_jax.data import eurosat
from edgevl_jax.data import info as info_lib
from edgevl_jax.data import local_rgbd
from edgevl_jax.data import records
from edgevl_jax.data.nyuv2 import nyuv2_dataset_builder
from edgevl_jax.data.scannet import scannet_dataset_builder
from edgevl_jax.data.sun_rgbd import sun_rgbd_dataset_builder
from edgevl_jax.data.synthetic_rgbd import synthetic_rgbd_dataset_builder

# Kept here for callers that import them from sources.
PairedSource = records.PairedSource
tfds_data_source = records.tfds_data_source

LOCAL_BUILDERS = {"scannet": scannet_dataset_builder.Builder,
                  "sun_rgbd": sun_rgbd_dataset_builder.Builder,
                  "nyuv2": nyuv2_dataset_builder.Builder}


def _synthetic_convert(raw: records.Record, index: int) -> records.Record:
  return {"rgb": raw["rgb"], "other": raw["depth"],
          "label": int(raw["label"]), "index": index,
          "caption": records.decode_text(raw["caption"])}


# 'custom_<size>px_<train>_<val>_<test>': a synthetic config of that size
# (seed 0), so run configs name any size with a plain string.
_CUSTOM = re.compile(r"^custom_(\d+)px_(\d+)_(\d+)_(\d+)$")


def synthetic_builder(data_dir: str, config: Any = None):
  """The synthetic RGB-D TFDS builder for `config` (name or config object,
  or 'custom_<size>px_<train>_<val>_<test>')."""
  sb = synthetic_rgbd_dataset_builder
  config = config or sb.Builder.DEFAULT_CONFIG_NAME
  match = _CUSTOM.match(config) if isinstance(config, str) else None
  if match:
    size, train, val, test = (int(g) for g in match.groups())
    config = sb.make_config(image_size=size, num_train=train,
                            num_validation=val, num_test=test)
  names = [c.name for c in sb.Builder.BUILDER_CONFIGS]
  if isinstance(config, str) and config not in names:
    raise ValueError(f"Unknown synthetic_rgbd config {config!r}; expected "
                     f"one of {names} or a make_config(...) object.")
  return sb.Builder(config=config, data_dir=data_dir,
                    file_format="array_record")


def load_split(name: str, split: str, *, data_dir: str,
               config: Any = None,
               on_source_change: str = "error",
               rgb_resample: str = "area") -> records.PairedSource:
  """Random-access source of one split, preparing the dataset if needed.

  Args:
    name: dataset name, one of `info.DATASET_NAMES`.
    split: 'train', 'validation' or 'test'.
    data_dir: TFDS data directory (prepared data lives under it).
    config: builder config. synthetic_rgbd: a config name ('demo', 'demo48',
      'small', 'large', 'tiny') or `synthetic_rgbd.make_config(...)`.
      scannet / sun_rgbd / nyuv2: the folder of the user's local copy
      (required the first time, to prepare; when given later, the prepared
      copy is checked against it). eurosat: unused.
    on_source_change: scannet / sun_rgbd / nyuv2 only: 'error' (default)
      refuses a prepared copy whose source folder changed since; 'reprepare'
      prepares it again (see local_rgbd.py).
    rgb_resample: scannet only: how its 1296 x 968 colour frames are resized
      to the 640 x 480 depth size on reading: 'area' (default), 'bilinear'
      or 'nearest' (what the reference code does).

  Returns:
    A PairedSource of standard records (records.py).
  """
  info = info_lib.get_info(name)
  if name == "synthetic_rgbd":
    builder = synthetic_builder(data_dir, config)
    builder.download_and_prepare()
    return records.PairedSource(
        records.tfds_split(builder, split, name), _synthetic_convert,
        info=info, split=split)
  if name == "eurosat":
    return eurosat.load_split(split, data_dir=data_dir)
  return local_rgbd.load_split(LOCAL_BUILDERS[name], split,
                               data_dir=data_dir, source_dir=config,
                               on_source_change=on_source_change,
                               rgb_resample=rgb_resample)
