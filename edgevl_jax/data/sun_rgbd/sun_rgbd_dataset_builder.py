"""TFDS builder: SUN RGB-D scenes (19 scene classes) from a local copy.

Point it at the folder of your copy (manual_dir); the expected layout is in
edgevl_jax/data/local_layouts.py (scan_sun_rgbd).
"""
from edgevl_jax.data import local_rgbd


class Builder(local_rgbd.LocalRgbdBuilder):
  """SUN RGB-D scenes (19 scene classes), RGB and depth files stored as encoded bytes."""

  DATASET = "sun_rgbd"
