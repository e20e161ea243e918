"""Per-dataset facts in one place: class names, prompts, superset vocabulary.

Every dataset the project can load has one `DatasetInfo`: the names the
zero-shot classifier embeds, the prompt templates, the generic superset
vocabulary used for teacher pseudo-labels (EdgeVL curation, before stage 1),
and the name of the non-RGB modality. `get_info(name)` is the only accessor.
"""
import dataclasses
import re
from typing import Sequence

import numpy as np

from edgevl_jax.data.synthetic_rgbd.geometry import CLASS_NAMES as _SYNTH_NAMES
from edgevl_jax.data.synthetic_rgbd.geometry import DISTRACTOR_NAMES as _SYNTH_DISTRACTORS


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a trainer or evaluator needs to know about one dataset.

  Attributes:
    name: registry name (`get_info(name)`).
    class_names: readable class names, index = label id.
    prompt_templates: format strings with one `{}` for the class name; the
      first is the paper's single prompt, the rest allow prompt ensembling.
    superset_vocabulary: generic names the teacher labels train images with
      for curation; a superset of `class_names`.
    other_modality: name of the non-RGB modality ('depth' or 'swir').
    train_class_ids: for class-disjoint protocols (EuroSAT), the label ids seen
      in train/validation; None when every split holds every class.
    test_class_ids: likewise for the test split.
  """
  name: str
  class_names: tuple[str, ...]
  prompt_templates: tuple[str, ...]
  superset_vocabulary: tuple[str, ...]
  other_modality: str
  train_class_ids: tuple[int, ...] | None = None
  test_class_ids: tuple[int, ...] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def prompts(self, names: Sequence[str] | None = None,
              template_index: int = 0) -> list[str]:
    """Returns one prompt per name (default: the class names).

    "a {}" becomes "an {}" before a vowel ("a photo of an arch.").
    """
    names = self.class_names if names is None else names
    template = self.prompt_templates[template_index]
    return [re.sub(r"\ba ([aeiou])", r"an \1", template.format(n))
            for n in names]


# ScanNet's 21 scene types, as EdgeVL names them (its label files use the
# ScanNet scene-type strings; slashes join ScanNet's merged types).
SCANNET_CLASSES = (
    "apartment", "bathroom", "bedroom/hotel", "bookstore/library",
    "classroom", "closet", "computer cluster", "conference room",
    "copy/mail room", "dining room", "game room", "gym", "hallway", "kitchen",
    "laundry room", "living room/lounge", "lobby", "office", "stairs",
    "storage/basement/garage", "misc")

# SUN RGB-D scene classes used for scene classification (19).
SUNRGBD_CLASSES = (
    "bathroom", "bedroom", "classroom", "computer room", "conference room",
    "corridor", "dining area", "dining room", "discussion area",
    "furniture store", "home office", "kitchen", "lab", "lecture theatre",
    "library", "living room", "office", "rest space", "study space")

# NYUv2 labelled-set scene types (27); the files spell "excercise_room".
NYUV2_CLASSES = (
    "basement", "bathroom", "bedroom", "bookstore", "cafe", "classroom",
    "computer lab", "conference room", "dinette", "dining room",
    "exercise room", "foyer", "furniture store", "home office",
    "home storage", "indoor balcony", "kitchen", "laundry room",
    "living room", "office", "office kitchen", "playroom", "printer room",
    "reception room", "student lounge", "study", "study room")

EUROSAT_CLASSES = (
    "annual crop", "forest", "herbaceous vegetation", "highway", "industrial",
    "pasture", "permanent crop", "residential", "river", "sea lake")


def reference_class_split(num_classes: int = 10, num_train: int = 5,
                          seed: int = 0
                          ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """EdgeVL's class-disjoint split: (train class ids, test class ids).

  The reference script (preprocess_dataset/eurosat/create_split.py) draws
  `np.random.seed(seed); np.random.choice(num_classes, num_classes,
  replace=False)` and gives the first `num_train` classes to train, the
  rest to test. For EuroSAT in TFDS label order this is train {1, 2, 4, 8,
  9} (forest, herbaceous vegetation, industrial, river, sea lake), test
  {0, 3, 5, 6, 7} (annual crop, highway, pasture, permanent crop,
  residential).
  """
  order = np.random.RandomState(seed).choice(num_classes, num_classes,
                                             replace=False)
  return (tuple(sorted(int(c) for c in order[:num_train])),
          tuple(sorted(int(c) for c in order[num_train:])))


EUROSAT_TRAIN_CLASS_IDS, EUROSAT_TEST_CLASS_IDS = reference_class_split()


def _union(*groups: Sequence[str]) -> tuple[str, ...]:
  seen = {}
  for g in groups:
    for n in g:
      seen.setdefault(n, None)
  return tuple(seen)


# About 50 generic indoor scene names covering all three indoor datasets.
INDOOR_SUPERSET = _union(
    SCANNET_CLASSES, SUNRGBD_CLASSES, NYUV2_CLASSES)

# About 15 generic satellite scene names including EuroSAT's 10.
SATELLITE_SUPERSET = _union(
    EUROSAT_CLASSES,
    ("desert", "airport", "parking lot", "beach", "mountain", "bare soil"))

_INDOOR_TEMPLATES = ("a photo of a {}.", "a photo of the {}.",
                     "a picture of a {}.", "an image of an indoor {}.")
_SAT_TEMPLATES = ("a satellite image of a {}.", "a satellite photo of {}.",
                  "an aerial view of {}.", "a centered satellite image of {}.")
_SYNTH_TEMPLATES = ("a photo of a {}.", "a rendering of a {}.",
                    "a {} on a floor.", "a picture of a {} in a room.")

_REGISTRY = {
    "synthetic_rgbd": DatasetInfo(
        name="synthetic_rgbd", class_names=_SYNTH_NAMES,
        prompt_templates=_SYNTH_TEMPLATES,
        superset_vocabulary=_union(_SYNTH_NAMES, _SYNTH_DISTRACTORS),
        other_modality="depth"),
    "eurosat": DatasetInfo(
        name="eurosat", class_names=EUROSAT_CLASSES,
        prompt_templates=_SAT_TEMPLATES,
        superset_vocabulary=SATELLITE_SUPERSET, other_modality="swir",
        # Paper protocol: class-disjoint train and test halves.
        train_class_ids=EUROSAT_TRAIN_CLASS_IDS,
        test_class_ids=EUROSAT_TEST_CLASS_IDS),
    "scannet": DatasetInfo(
        name="scannet", class_names=SCANNET_CLASSES,
        prompt_templates=_INDOOR_TEMPLATES,
        superset_vocabulary=INDOOR_SUPERSET, other_modality="depth"),
    "sun_rgbd": DatasetInfo(
        name="sun_rgbd", class_names=SUNRGBD_CLASSES,
        prompt_templates=_INDOOR_TEMPLATES,
        superset_vocabulary=INDOOR_SUPERSET, other_modality="depth"),
    "nyuv2": DatasetInfo(
        name="nyuv2", class_names=NYUV2_CLASSES,
        prompt_templates=_INDOOR_TEMPLATES,
        superset_vocabulary=INDOOR_SUPERSET, other_modality="depth"),
}

DATASET_NAMES = tuple(_REGISTRY)


def get_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of dataset `name` (see `DATASET_NAMES`)."""
  if name not in _REGISTRY:
    raise ValueError(
        f"Unknown dataset name {name!r}; expected one of {DATASET_NAMES}.")
  return _REGISTRY[name]
