"""Dataset facts: curation vocabularies and prompts as the paper uses them."""
import pytest

from edgevl_jax import data
from edgevl_jax.data import info as info_lib

# EDGEVL.md, "Pseudo-labels and curation", verbatim.
SATELLITE = (
    "Urban or Built-up Areas", "Agriculture", "Forest", "Grassland",
    "Water Bodies", "Wetlands", "Desert", "Snow and Ice",
    "Bare Land or Barren", "Mountainous Terrain", "Coastal Zones",
    "Riparian Zones", "Glacial and Periglacial Landscapes",
    "Volcanic Features", "Urban Green Spaces")
INDOOR = """Living Room, Kitchen, Bedroom, Bathroom, Dining Room, Home Office,
Basement, Attic, Office and Cubicles, Conference Room, Classroom, Laboratory,
Library, Gym/Fitness Center, Shopping Mall, Retail Store, Hotel Lobby, Hotel
Room, Restaurant, Cafe, Bar or Nightclub, Cinema/Theater, Airport Terminal,
Subway Station, Train Station, Bus Interior, Hospital Ward, Operating Room,
Dental Clinic, Veterinary Clinic, Museum, Art Gallery, Church, Temple, Mosque,
Classroom, Lecture Hall, Laboratory, School Hallway, Dormitory, Indoor Pool,
Bowling Alley, Arcade, Indoor Playground, Courthouse, City Hall, Police
Station, Fire Station, Factory Floor, Warehouse, Server Room"""
INDOOR = tuple(" ".join(n.split()) for n in INDOOR.split(","))


def test_eurosat_curates_against_the_published_15_not_its_test_classes():
  info = data.get_info("eurosat")
  assert info.superset_vocabulary == info.vocabulary() == SATELLITE
  lower = {n.lower() for n in info.superset_vocabulary}
  for held_out in ("sea lake", "residential", "highway"):
    assert held_out not in lower
  # No held-out test class at all ("Forest" is generic and a train class).
  assert not lower & {info.class_names[i] for i in info.test_class_ids}
  # The dataset's own classes stay available, by name, for ablations.
  assert info.vocabulary("classes") == info.class_names


def test_indoor_datasets_share_the_published_51_lines_deduplicated():
  assert len(INDOOR) == 51 and info_lib.PUBLISHED_INDOOR_LINES == INDOOR
  for name in ("scannet", "sun_rgbd", "nyuv2"):
    info = data.get_info(name)
    vocab = info.vocabulary()
    assert len(vocab) == 49 == len(set(vocab))  # Classroom, Laboratory once
    assert vocab == tuple(dict.fromkeys(INDOOR))
    assert info.published_lines == INDOOR
    assert "misc" not in vocab and "bedroom/hotel" not in vocab


def test_prompts_render_names_as_the_reference_does():
  indoor, sat = data.get_info("scannet"), data.get_info("eurosat")
  # Lower-cased, article by the first letter, no final period.
  assert indoor.prompts(["Living Room", "Office and Cubicles"]) == [
      "a photo of a living room", "a photo of an office and cubicles"]
  assert sat.prompts(["Urban or Built-up Areas"]) == [
      "a satellite image of an urban or built-up areas"]
  # The reference code's own rendering drops lower-case words, on request.
  exact = indoor.vocabulary("reference_rendering")
  assert len(exact) == 51 and exact[8] == "office cubicles"
  assert exact[13] == "gym fitness center"
  assert sat.vocabulary("reference_rendering")[0] == "urban built areas"


def test_synthetic_keeps_its_own_vocabulary_and_bad_kinds_are_named():
  info = data.get_info("synthetic_rgbd")
  assert set(info.class_names) < set(info.vocabulary())
  assert "capsule" in info.vocabulary()
  with pytest.raises(ValueError, match="no published vocabulary"):
    info.vocabulary("reference_rendering")
  with pytest.raises(ValueError, match="Unknown vocabulary 'imagenet'"):
    info.vocabulary("imagenet")
