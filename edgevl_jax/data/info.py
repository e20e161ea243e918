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


# Curation vocabularies `DatasetInfo.vocabulary` offers.
VOCABULARIES = ("published", "reference_rendering", "classes")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a trainer or evaluator needs to know about one dataset.

  Attributes:
    name: registry name (`get_info(name)`).
    class_names: readable class names, index = label id.
    prompt_templates: format strings with one `{}` for the class name; the
      first is the paper's single prompt, the rest allow prompt ensembling.
    superset_vocabulary: the generic names the teacher labels train images
      with for curation (`vocabulary('published')`): for the paper's
      datasets the reference's published list, each name once, spelled as
      published; it is not built from `class_names`.
    other_modality: name of the non-RGB modality ('depth' or 'swir').
    train_class_ids: for class-disjoint protocols (EuroSAT), the label ids seen
      in train/validation; None when every split holds every class.
    test_class_ids: likewise for the test split.
    published_lines: the reference's vocabulary file line for line
      (duplicates kept); None for a dataset the paper does not use.
  """
  name: str
  class_names: tuple[str, ...]
  prompt_templates: tuple[str, ...]
  superset_vocabulary: tuple[str, ...]
  other_modality: str
  train_class_ids: tuple[int, ...] | None = None
  test_class_ids: tuple[int, ...] | None = None
  published_lines: tuple[str, ...] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def vocabulary(self, kind: str = "published") -> tuple[str, ...]:
    """The names the teacher pseudo-labels train images against.

    Args:
      kind: one of VOCABULARIES.
        'published' (default): `superset_vocabulary`, the paper's protocol
          (synthetic_rgbd: its own class and distractor names).
        'reference_rendering': the published lines as the reference code's
          prompts name them (`reference_name`: "office cubicles"), its two
          duplicates kept, to reproduce its text features exactly.
        'classes': the dataset's own class names. This hands the
          evaluation taxonomy to curation (for EuroSAT also its held-out
          test classes), which the paper does not do; for ablations only.
    """
    if kind == "published":
      return self.superset_vocabulary
    if kind == "classes":
      return self.class_names
    if kind == "reference_rendering" and self.published_lines:
      return tuple(reference_name(n) for n in self.published_lines)
    if kind == "reference_rendering":
      raise ValueError(f"Dataset {self.name!r} has no published vocabulary "
                       "to render as the reference does; use "
                       "vocabulary='published' (its own) or 'classes'.")
    raise ValueError(f"Unknown vocabulary {kind!r}; expected one of "
                     f"{VOCABULARIES}.")

  def prompts(self, names: Sequence[str] | None = None,
              template_index: int = 0) -> list[str]:
    """Returns one prompt per name (default: the class names).

    As in the reference, names are lower-cased ("Living Room" -> "a photo
    of a living room") and "a {}" becomes "an {}" before a vowel ("a photo
    of an arch").
    """
    names = self.class_names if names is None else names
    template = self.prompt_templates[template_index]
    return [re.sub(r"\ba ([aeiou])", r"an \1", template.format(n.lower()))
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
  """The names of `groups` in order, each once."""
  return tuple(dict.fromkeys(n for g in groups for n in g))


# The reference's generic superset vocabularies, line for line
# (preprocess_dataset/indoor_categories.txt and satellite_categories.txt of
# the EdgeVL code): the teacher labels train images against these, never
# against a dataset's own (test) taxonomy. Indoor has 51 lines with
# "Classroom" and "Laboratory" twice. (The reference file spells "Café".)
PUBLISHED_INDOOR_LINES = (
    "Living Room", "Kitchen", "Bedroom", "Bathroom", "Dining Room",
    "Home Office", "Basement", "Attic", "Office and Cubicles",
    "Conference Room", "Classroom", "Laboratory", "Library",
    "Gym/Fitness Center", "Shopping Mall", "Retail Store", "Hotel Lobby",
    "Hotel Room", "Restaurant", "Cafe", "Bar or Nightclub", "Cinema/Theater",
    "Airport Terminal", "Subway Station", "Train Station", "Bus Interior",
    "Hospital Ward", "Operating Room", "Dental Clinic", "Veterinary Clinic",
    "Museum", "Art Gallery", "Church", "Temple", "Mosque", "Classroom",
    "Lecture Hall", "Laboratory", "School Hallway", "Dormitory",
    "Indoor Pool", "Bowling Alley", "Arcade", "Indoor Playground",
    "Courthouse", "City Hall", "Police Station", "Fire Station",
    "Factory Floor", "Warehouse", "Server Room")
PUBLISHED_SATELLITE_LINES = (
    "Urban or Built-up Areas", "Agriculture", "Forest", "Grassland",
    "Water Bodies", "Wetlands", "Desert", "Snow and Ice",
    "Bare Land or Barren", "Mountainous Terrain", "Coastal Zones",
    "Riparian Zones", "Glacial and Periglacial Landscapes",
    "Volcanic Features", "Urban Green Spaces")

# The default curation vocabularies: the published lists, each name once.
# A duplicate would split its softmax mass over two identical text
# features and halve the confidence that curation ranks by.
INDOOR_SUPERSET = _union(PUBLISHED_INDOOR_LINES)
SATELLITE_SUPERSET = _union(PUBLISHED_SATELLITE_LINES)


def reference_name(line: str) -> str:
  """A vocabulary line as the reference code puts it into its prompt.

  Its `convert_string` keeps the capitalised words and lower-cases them
  (`re.findall('[A-Z][a-z]*', line)`), so lower-case words, hyphenated
  tails and slashes drop out: "Office and Cubicles" -> "office cubicles",
  "Urban or Built-up Areas" -> "urban built areas".
  """
  return " ".join(re.findall("[A-Z][a-z]*", line)).lower()


# The first template of each is the reference's prompt, word for word.
_INDOOR_TEMPLATES = ("a photo of a {}", "a photo of the {}.",
                     "a picture of a {}.", "an image of an indoor {}.")
_SAT_TEMPLATES = ("a satellite image of a {}", "a satellite photo of {}.",
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
        published_lines=PUBLISHED_SATELLITE_LINES,
        # Paper protocol: class-disjoint train and test halves.
        train_class_ids=EUROSAT_TRAIN_CLASS_IDS,
        test_class_ids=EUROSAT_TEST_CLASS_IDS),
    "scannet": DatasetInfo(
        name="scannet", class_names=SCANNET_CLASSES,
        prompt_templates=_INDOOR_TEMPLATES,
        superset_vocabulary=INDOOR_SUPERSET, other_modality="depth",
        published_lines=PUBLISHED_INDOOR_LINES),
    "sun_rgbd": DatasetInfo(
        name="sun_rgbd", class_names=SUNRGBD_CLASSES,
        prompt_templates=_INDOOR_TEMPLATES,
        superset_vocabulary=INDOOR_SUPERSET, other_modality="depth",
        published_lines=PUBLISHED_INDOOR_LINES),
    "nyuv2": DatasetInfo(
        name="nyuv2", class_names=NYUV2_CLASSES,
        prompt_templates=_INDOOR_TEMPLATES,
        superset_vocabulary=INDOOR_SUPERSET, other_modality="depth",
        published_lines=PUBLISHED_INDOOR_LINES),
}

DATASET_NAMES = tuple(_REGISTRY)


def get_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of dataset `name` (see `DATASET_NAMES`)."""
  if name not in _REGISTRY:
    raise ValueError(
        f"Unknown dataset name {name!r}; expected one of {DATASET_NAMES}.")
  return _REGISTRY[name]
