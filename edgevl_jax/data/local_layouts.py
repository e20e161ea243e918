"""Folder layouts of users' local RGB-D scene datasets (as EdgeVL uses them).

Each `scan_*` function reads one layout, checks that every file it needs is
there, and returns the samples of each split; a missing file is reported by
name (all of them, first ones listed) in one ValueError.

ScanNet (EdgeVL's every-100th-frame conversion, nicr-scene-analysis-datasets
with `--subsample 100`):
  ROOT/train_every_100th.txt, ROOT/valid_every_100th.txt   one id a line,
      id = "<scene>/<frame>", e.g. "scene0000_00/00100"
  ROOT/{train,valid}/rgb/<id>.jpg        colour frame, 1296 x 968
  ROOT/{train,valid}/depth/<id>.png      uint16 depth, millimetres, 640 x 480
  ROOT/{train,valid}/scene_class/<scene>.txt   scene type, e.g. "bedroom/hotel"
SUN RGB-D (EdgeVL's crop preprocessing):
  ROOT/{train,test}/rgb/<class>__<n>.jpg and ROOT/{train,test}/depth/<same>.png
NYUv2 labelled set:
  ROOT/{train,test}.txt          integer ids, one a line
  ROOT/{train,test}/{rgb,depth}/<id:04d>.png
  ROOT/{train,test}/scene_class/<id:04d>.txt   scene type, e.g. "living_room"

Splits: 'test' is the dataset's own held-out list (ScanNet: valid); a
'validation' split for model selection is carved from train with a fixed
seed (ScanNet: whole scenes, so frames of one scene never straddle).

`validate_source(name, root)` scans a layout and then decodes every file
(`check_files`): a truncated or non-image file, a depth image with three
different channels, or an RGB / depth pair of different sizes is reported
with its record and file before anything is prepared, never at first read.
Layouts in RESIZE_RGB_TO_DEPTH (ScanNet, whose colour and depth cameras
differ in resolution) instead accept an RGB frame of another size with the
depth frame's aspect ratio: the published protocol resizes it to the depth
size when it is read (local_rgbd.py).
"""
import concurrent.futures
import dataclasses
import glob
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from edgevl_jax.data import info as info_lib
from edgevl_jax.data import transforms

VALIDATION_FRACTION = 0.1
SPLITS = ("train", "validation", "test")
# Layouts whose RGB frames are resized to the depth frame's size on reading
# (the reference resizes ScanNet's 1296 x 968 colour to 640 x 480 depth).
RESIZE_RGB_TO_DEPTH = frozenset({"scannet"})
# How far the two aspect ratios of such a pair may differ (ScanNet: 0.4 %).
ASPECT_TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class Sample:
  key: str
  rgb_path: str
  depth_path: str
  label: int


def _label_id(name: str, raw: str, where: str) -> int:
  """Maps a label string from disk to the dataset's class id."""
  names = info_lib.get_info(name).class_names
  text = "/".join(p.strip() for p in raw.strip().split("/"))
  text = text.replace("_", " ").lower()
  text = _ALIASES.get(text, text)
  if text not in names:
    raise ValueError(f"{where}: unknown {name} scene class {raw.strip()!r}; "
                     f"expected one of {names}.")
  return names.index(text)


_ALIASES = {"excercise room": "exercise room", "computercluster":
            "computer cluster"}


def _read_lines(path: str) -> list[str]:
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def _first_line(path: str, name: str) -> str:
  """The first non-empty line of a label file; ValueError naming it."""
  lines = _read_lines(path)
  if not lines:
    raise ValueError(f"{name}: label file {path!r} is empty; it must hold "
                     "the scene class on its first line.")
  return lines[0]


def _numbered_lines(path: str) -> list[tuple[int, str]]:
  """(line number, stripped text) of the non-empty lines of `path`."""
  with open(path) as f:
    return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def _bad_ids(path: str, bad: list[tuple[int, str]], expected: str,
             name: str) -> ValueError:
  shown = ", ".join(f"line {n}: {text!r}" for n, text in bad[:10])
  more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
  return ValueError(
      f"{name}: {path!r} has {len(bad)} id(s) that are not {expected}: "
      f"{shown}{more}. Fix or remove those lines.")


def _require(root: str, paths: list[str], name: str) -> None:
  """Raises one ValueError listing every missing path (relative to root)."""
  if not os.path.isdir(root):
    raise ValueError(f"{name}: source folder {root!r} does not exist; pass "
                     "the folder of your local copy.")
  missing = [p for p in paths if not os.path.exists(os.path.join(root, p))]
  if missing:
    shown = ", ".join(missing[:10])
    more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
    raise ValueError(
        f"{name}: the folder {root!r} does not match the expected layout; "
        f"missing {len(missing)} path(s): {shown}{more}. See "
        "edgevl_jax/data/local_layouts.py for the layout.")


def _carve(samples: list[Sample], groups: list[str], seed: int = 0):
  """Splits samples into (train, validation) by group, 10 % of groups."""
  uniq = sorted(set(groups))
  order = np.random.default_rng(seed).permutation(len(uniq))
  n_val = max(1, int(round(VALIDATION_FRACTION * len(uniq)))) if len(
      uniq) > 1 else 0
  val_groups = {uniq[i] for i in order[:n_val]}
  train = [s for s, g in zip(samples, groups) if g not in val_groups]
  val = [s for s, g in zip(samples, groups) if g in val_groups]
  return train, val


def scan_scannet(root: str) -> dict[str, list[Sample]]:
  """ScanNet every-100th-frame layout -> samples per split."""
  lists = {"train": "train_every_100th.txt", "test": "valid_every_100th.txt"}
  _require(root, list(lists.values()), "scannet")
  out, groups = {}, {}
  for split, list_file in lists.items():
    folder = "train" if split == "train" else "valid"
    list_path = os.path.join(root, list_file)
    lines = _numbered_lines(list_path)
    bad = [(n, t) for n, t in lines if not _SCANNET_ID.fullmatch(t)]
    if bad:
      raise _bad_ids(list_path, bad, "'<scene>/<frame number>' (e.g. "
                     "'scene0000_00/00100')", "scannet")
    ids = [t for _, t in lines]
    needed = []
    for i in ids:
      scene = i.rsplit("/", 1)[0]
      needed += [f"{folder}/rgb/{i}.jpg", f"{folder}/depth/{i}.png",
                 f"{folder}/scene_class/{scene}.txt"]
    _require(root, sorted(set(needed), key=needed.index), "scannet")
    samples, scenes = [], []
    for i in ids:
      scene = i.rsplit("/", 1)[0]
      label_file = os.path.join(root, folder, "scene_class", scene + ".txt")
      label = _label_id("scannet", _first_line(label_file, "scannet"),
                        label_file)
      samples.append(Sample(i, os.path.join(root, folder, "rgb", i + ".jpg"),
                            os.path.join(root, folder, "depth", i + ".png"),
                            label))
      scenes.append(scene)
    out[split], groups[split] = samples, scenes
  out["train"], out["validation"] = _carve(out["train"], groups["train"])
  return out


def scan_sun_rgbd(root: str) -> dict[str, list[Sample]]:
  """SUN RGB-D crop layout -> samples per split."""
  _require(root, ["train/rgb", "train/depth", "test/rgb", "test/depth"],
           "sun_rgbd")
  out = {}
  for split in ("train", "test"):
    rgbs = sorted(glob.glob(os.path.join(root, split, "rgb", "*.jpg")))
    if not rgbs:
      raise ValueError(f"sun_rgbd: no .jpg files in "
                       f"{os.path.join(root, split, 'rgb')!r}.")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in rgbs]
    _require(root, [f"{split}/depth/{s}.png" for s in stems], "sun_rgbd")
    out[split] = [
        Sample(s, p, os.path.join(root, split, "depth", s + ".png"),
               _label_id("sun_rgbd", s.split("__")[0], p))
        for s, p in zip(stems, rgbs)]
  out["train"], out["validation"] = _carve(
      out["train"], [s.key for s in out["train"]])
  return out


def scan_nyuv2(root: str) -> dict[str, list[Sample]]:
  """NYUv2 labelled-set layout -> samples per split."""
  _require(root, ["train.txt", "test.txt"], "nyuv2")
  out = {}
  for split in ("train", "test"):
    list_path = os.path.join(root, f"{split}.txt")
    lines = _numbered_lines(list_path)
    bad = [(n, t) for n, t in lines if not t.isdigit()]
    if bad:
      raise _bad_ids(list_path, bad, "integer image numbers (e.g. '12')",
                     "nyuv2")
    ids = [int(t) for _, t in lines]
    keys = [f"{i:04d}" for i in ids]
    _require(root, [f"{split}/{m}/{k}.{e}" for k in keys for m, e in
                    (("rgb", "png"), ("depth", "png"),
                     ("scene_class", "txt"))], "nyuv2")
    samples = []
    for k in keys:
      label_file = os.path.join(root, split, "scene_class", k + ".txt")
      samples.append(Sample(
          k, os.path.join(root, split, "rgb", k + ".png"),
          os.path.join(root, split, "depth", k + ".png"),
          _label_id("nyuv2", _first_line(label_file, "nyuv2"), label_file)))
    out[split] = samples
  out["train"], out["validation"] = _carve(
      out["train"], [s.key for s in out["train"]])
  return out


SCANNERS = {"scannet": scan_scannet, "sun_rgbd": scan_sun_rgbd,
            "nyuv2": scan_nyuv2}
_SCANNET_ID = re.compile(r"[^/\s]+/\d+")


def _read_image(path: str, *, fast: bool) -> tuple[tuple[int, int], Any]:
  """((width, height), array or None) of an image file, fully decoded.

  fast: decode a JPEG at reduced scale (draft mode still reads every byte,
  so truncation is detected) and return no array.
  """
  with Image.open(path) as img:
    size = img.size
    if fast and img.format == "JPEG":
      img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
    img.load()
    return size, None if fast else np.asarray(img)


def check_sample(sample: Sample, *, split: str, root: str = "",
                 resize_rgb: bool = False) -> list[str]:
  """Problems of one record's files ([] when it decodes as a valid pair).

  Files are named relative to `root` when given. resize_rgb: the RGB frame
  will be resized to the depth size, so only the aspect ratios must agree.
  """
  where = f"{split} record {sample.key!r}"
  problems = []
  sizes = {}
  rel = lambda p: os.path.relpath(p, root) if root else p
  for kind, path in (("rgb", sample.rgb_path), ("depth", sample.depth_path)):
    if os.path.isfile(path) and os.path.getsize(path) == 0:
      problems.append(f"{where}: {kind} file {rel(path)} is empty (0 bytes)")
      continue
    try:
      sizes[kind], array = _read_image(path, fast=kind == "rgb")
    except Exception as e:  # PIL raises several types for a bad file.
      problems.append(f"{where}: {kind} file {rel(path)} is not a readable "
                      f"image (truncated or not an image: "
                      f"{type(e).__name__}: {e})")
      continue
    if kind == "depth":
      try:
        transforms.single_channel(array, "depth",
                                  where=f"{where}: {rel(path)}")
      except ValueError as e:
        problems.append(str(e).rstrip("."))
  if len(sizes) == 2 and sizes["rgb"] != sizes["depth"]:
    (w1, h1), (w2, h2) = sizes["rgb"], sizes["depth"]
    if not resize_rgb:
      problems.append(
          f"{where}: image sizes differ: rgb {rel(sample.rgb_path)} is "
          f"{h1}x{w1} but depth {rel(sample.depth_path)} is {h2}x{w2} "
          "(H x W); paired images must be co-registered")
    elif abs((w1 / h1) / (w2 / h2) - 1.0) > ASPECT_TOLERANCE:
      problems.append(
          f"{where}: aspect ratios differ: rgb {rel(sample.rgb_path)} is "
          f"{h1}x{w1} but depth {rel(sample.depth_path)} is {h2}x{w2} "
          "(H x W); the RGB frame is resized to the depth size, which "
          "needs the same aspect ratio (within "
          f"{ASPECT_TOLERANCE:.0%})")
  return problems


def check_files(name: str, samples: dict[str, list[Sample]], *,
                root: str = "", workers: int | None = None) -> None:
  """Decodes every file of every record; one ValueError listing the bad ones.

  Costs one decode per file (JPEGs at 1/8 scale), in `workers` threads.
  Files are named relative to `root` (the source folder) when given.
  """
  jobs = [(split, s) for split in sorted(samples) for s in samples[split]]
  workers = workers or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    found = pool.map(lambda job: check_sample(
        job[1], split=job[0], root=root,
        resize_rgb=name in RESIZE_RGB_TO_DEPTH), jobs)
    problems = [p for ps in found for p in ps]
  if problems:
    shown = "; ".join(problems[:10])
    more = (f"; and {len(problems) - 10} more problems"
            if len(problems) > 10 else "")
    raise ValueError(
        f"{name}: {len(problems)} bad record(s) in the local copy "
        f"{root or '(no root given)'}: {shown}"
        f"{more}. Replace those files (re-export or re-copy them) or remove "
        "the records from the layout, then prepare again.")


def validate_source(name: str, root: str) -> dict[str, list[Sample]]:
  """Scans layout `name` at `root` and checks every file: samples per split.

  Raises:
    ValueError: missing files, malformed ids or label files, or records whose
      files do not decode (each named with its record and path).
  """
  if name not in SCANNERS:
    raise ValueError(f"No local layout {name!r}; expected one of "
                     f"{sorted(SCANNERS)}.")
  samples = SCANNERS[name](root)
  check_files(name, samples, root=root)
  return samples
