"""TFDS builders for local RGB-D scene datasets, and their loading.

The user downloads ScanNet / SUN RGB-D / NYUv2 themselves (licences forbid
redistribution) and points the builder at the folder (TFDS 'manual_dir').
The layout is validated first (local_layouts.py names every missing file
and every record whose files do not decode), then each pair is stored as its
original encoded files (JPEG/PNG bytes) in array_record, so preparing is a
copy and reading needs only PIL, no TensorFlow. Depth PNGs keep their
integer values (uint16 millimetres for ScanNet and NYUv2); min-max scaling
happens in the pipeline.

ScanNet's colour frames (1296 x 968) are larger than its depth frames
(640 x 480); as in the reference, each RGB frame is resized to its depth
frame's size when read (`rgb_resample`: 'area' by default, 'bilinear', or
'nearest', which the reference code uses), so the stored files stay the
originals. The other layouts must pair equal sizes (local_layouts.py).

The prepared copy remembers its source: `edgevl_source.json` beside the TFDS
files holds the source folder's absolute path and a fingerprint of its
listing (relative paths, sizes and modification times, hashed). Loading with
a source folder whose fingerprint differs (files added, removed, edited,
re-exported) refuses by default, naming both folders and the fix;
`on_source_change='reprepare'` deletes the stale copy and prepares again.
The same files at another path are accepted (the fingerprint holds
relative paths only).
"""
import functools
import hashlib
import io
import logging
import os
import shutil

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from edgevl_jax.data import info as info_lib
from edgevl_jax.data import local_layouts
from edgevl_jax.data import records
from edgevl_jax.data import tfds_builder
from edgevl_jax.data import transforms
from edgevl_jax.utils import io as io_lib

SOURCE_RECORD = "edgevl_source.json"
ON_SOURCE_CHANGE = ("error", "reprepare")
# PIL filters of `rgb_resample`. PIL shrinks with a filter as wide as the
# scale ('bilinear' is a triangle, 'area' a box average), so neither
# aliases; 'nearest' keeps one pixel in about four, as cv2.INTER_NEAREST
# in the reference.
RGB_RESAMPLE = {"area": Image.Resampling.BOX,
                "bilinear": Image.Resampling.BILINEAR,
                "nearest": Image.Resampling.NEAREST}


class LocalRgbdBuilder(tfds_builder.OwnCodePath,
                       tfds.core.GeneratorBasedBuilder):
  """Base builder; subclasses set DATASET (a key of local_layouts.SCANNERS)."""

  DATASET = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded RGB and depth files of a local copy."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the dataset yourself and pass its folder as manual_dir "
      "(edgevl_jax.data.load_split(name, split, data_dir=..., "
      "config=FOLDER)); the layout is described in "
      "edgevl_jax/data/local_layouts.py.")

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

  # Samples already validated by `load_split` (else validated here).
  validated_samples = None

  def _split_generators(self, dl_manager):
    samples = self.validated_samples or local_layouts.validate_source(
        self.DATASET, os.fspath(dl_manager.manual_dir))
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


def _decode(raw, index: int, *, name: str = "", split: str = "",
            rgb_resample: str | None = None):
  """A stored pair -> standard record; rgb_resample: resize RGB to depth."""
  rgb = Image.open(io.BytesIO(raw["rgb_file"])).convert("RGB")
  depth = np.asarray(Image.open(io.BytesIO(raw["depth_file"])))
  size = (depth.shape[1], depth.shape[0])
  if rgb_resample and rgb.size != size:
    rgb = rgb.resize(size, RGB_RESAMPLE[rgb_resample])
  rgb = np.asarray(rgb)
  key = records.decode_text(raw["key"])
  # Some exports save depth as 3 equal channels; different ones are refused.
  depth = transforms.single_channel(
      depth, "depth", where=f"{name}[{split}][{index}] record {key!r}")
  return {"rgb": rgb, "other": depth, "label": int(raw["label"]),
          "index": index}


def source_fingerprint(root: str) -> dict[str, object]:
  """Fingerprint of a source folder's listing (no file is read).

  sha256 over the sorted (relative path, size, mtime in ns) of every file
  under `root` (symlinks followed; names starting with '.' skipped, so a
  .DS_Store does not count).

  Returns:
    {'source_dir': absolute path, 'fingerprint': 'sha256:...',
     'num_files', 'num_bytes'}.
  """
  root = os.path.abspath(os.fspath(root))
  digest = hashlib.sha256()
  num_files = num_bytes = 0
  for folder, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for f in sorted(files):
      if f.startswith("."):
        continue
      path = os.path.join(folder, f)
      st = os.stat(path)
      rel = os.path.relpath(path, root).replace(os.sep, "/")
      digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
      num_files += 1
      num_bytes += st.st_size
  return {"source_dir": root, "fingerprint": "sha256:" + digest.hexdigest(),
          "num_files": num_files, "num_bytes": num_bytes}


def _record_file(b: LocalRgbdBuilder) -> str:
  return os.path.join(os.fspath(b.data_dir), SOURCE_RECORD)


def source_mismatch(b: LocalRgbdBuilder, name: str, source_dir: str
                    ) -> str | None:
  """Why the prepared copy of `b` does not match `source_dir`, or None."""
  now = source_fingerprint(source_dir)
  path = _record_file(b)
  if not os.path.exists(path):
    return (f"{name}: the prepared copy in {os.fspath(b.data_dir)!r} has no "
            f"{SOURCE_RECORD} (it was prepared by an older edgevl_jax or "
            "outside load_split), so it cannot be checked against the source "
            f"folder {now['source_dir']!r}")
  was = io_lib.read_json(path, required=("fingerprint",),
                         fix=f"delete {os.fspath(b.data_dir)!r} and prepare "
                         "again")
  if was["fingerprint"] == now["fingerprint"]:
    return None
  return (f"{name}: the prepared copy in {os.fspath(b.data_dir)!r} was made "
          f"from {was.get('source_dir')!r} ({was.get('num_files')} files, "
          f"{was.get('num_bytes')} bytes, fingerprint "
          f"{str(was['fingerprint'])[:19]}) but the source folder "
          f"{now['source_dir']!r} now lists {now['num_files']} files, "
          f"{now['num_bytes']} bytes (fingerprint "
          f"{str(now['fingerprint'])[:19]}): files were added, removed or "
          "modified since it was prepared, so the prepared copy is stale")


def _prepare(b: LocalRgbdBuilder, name: str, source_dir: str) -> None:
  """Validates `source_dir`, prepares `b` from it and records the source."""
  record = source_fingerprint(source_dir)
  # Validate (every file decoded) before TFDS creates any output folder.
  b.validated_samples = local_layouts.validate_source(name, source_dir)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(source_dir)))
  io_lib.atomic_write_json(_record_file(b), record)


def load_split(builder_class: type[LocalRgbdBuilder], split: str, *,
               data_dir: str, source_dir: str | None = None,
               on_source_change: str = "error",
               rgb_resample: str = "area") -> records.PairedSource:
  """PairedSource of a local dataset, preparing from source_dir if needed.

  Args:
    builder_class: the dataset's builder (a LocalRgbdBuilder subclass,
      e.g. scannet.Builder); its DATASET names the layout.
    split: one of `local_layouts.SPLITS`.
    data_dir: TFDS data directory holding the prepared copy.
    source_dir: the user's local copy; required to prepare. When given and
      the dataset is already prepared, the prepared copy must have been made
      from a source with the same fingerprint (module docstring).
    on_source_change: 'error' (default): refuse a stale prepared copy;
      'reprepare': delete it and prepare again from `source_dir`.
    rgb_resample: layouts in local_layouts.RESIZE_RGB_TO_DEPTH (ScanNet)
      only: how RGB frames are resized to the depth size, a key of
      RGB_RESAMPLE.
  """
  name = builder_class.DATASET
  if rgb_resample not in RGB_RESAMPLE:
    raise ValueError(f"rgb_resample={rgb_resample!r}; expected one of "
                     f"{sorted(RGB_RESAMPLE)}.")
  if split not in local_layouts.SPLITS:
    raise ValueError(f"{name} split {split!r} unknown; expected one of "
                     f"{local_layouts.SPLITS}.")
  if on_source_change not in ON_SOURCE_CHANGE:
    raise ValueError(f"on_source_change={on_source_change!r}; expected one "
                     f"of {ON_SOURCE_CHANGE}.")
  b = builder_class(data_dir=data_dir, file_format="array_record")
  if b.is_prepared() and source_dir is not None:
    if not os.path.isdir(source_dir):
      raise ValueError(
          f"{name}: source folder {os.fspath(source_dir)!r} does not exist, "
          "so the prepared copy in "
          f"{os.fspath(b.data_dir)!r} cannot be checked against it; pass the "
          "folder it was prepared from, or no source folder (config=None) "
          "to use the prepared copy as it is.")
    stale = source_mismatch(b, name, os.fspath(source_dir))
    if stale and on_source_change == "error":
      raise ValueError(
          f"{stale}. Re-prepare: delete {os.fspath(b.data_dir)!r}, or pass "
          "on_source_change='reprepare' to load_split; or point config at "
          "the folder it was prepared from.")
    if stale:
      logging.warning("%s; re-preparing (on_source_change='reprepare').",
                      stale)
      shutil.rmtree(os.fspath(b.data_dir))
      b = builder_class(data_dir=data_dir, file_format="array_record")
  if not b.is_prepared():
    if source_dir is None:
      raise ValueError(
          f"{name} is not prepared under data_dir={data_dir!r}; pass the "
          "folder of your local copy as config=FOLDER to prepare it.")
    _prepare(b, name, os.fspath(source_dir))
  return records.PairedSource(
      records.tfds_split(b, split, name),
      functools.partial(
          _decode, name=name, split=split,
          rgb_resample=(rgb_resample if name in
                        local_layouts.RESIZE_RGB_TO_DEPTH else None)),
      info=info_lib.get_info(name), split=split)
