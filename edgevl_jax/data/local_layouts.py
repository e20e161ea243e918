"""Folder layouts of users' local RGB-D scene datasets (as EdgeVL uses them).

Each `scan_*` function reads one layout, checks that every file it needs is
there, and returns the samples of each split; a missing file is reported by
name (all of them, first ones listed) in one ValueError.

ScanNet (EdgeVL's every-100th-frame conversion, nicr-scene-analysis-datasets
with `--subsample 100`):
  ROOT/train_every_100th.txt, ROOT/valid_every_100th.txt   one id a line,
      id = "<scene>/<frame>", e.g. "scene0000_00/00100"
  ROOT/{train,valid}/rgb/<id>.jpg        colour frame
  ROOT/{train,valid}/depth/<id>.png      uint16 depth, millimetres
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
"""
import dataclasses
import glob
import os

import numpy as np

from edgevl_jax.data import info as info_lib

VALIDATION_FRACTION = 0.1
SPLITS = ("train", "validation", "test")


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
    ids = _read_lines(os.path.join(root, list_file))
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
      label = _label_id("scannet", _read_lines(label_file)[0], label_file)
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
    ids = [int(x) for x in _read_lines(os.path.join(root, f"{split}.txt"))]
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
          _label_id("nyuv2", _read_lines(label_file)[0], label_file)))
    out[split] = samples
  out["train"], out["validation"] = _carve(
      out["train"], [s.key for s in out["train"]])
  return out


SCANNERS = {"scannet": scan_scannet, "sun_rgbd": scan_sun_rgbd,
            "nyuv2": scan_nyuv2}
