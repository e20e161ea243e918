"""TFDS builder: NYUv2 labelled scenes (27 scene types) from a local copy.

Point it at the folder of your copy (manual_dir); the expected layout is in
edgevl_jax/data/local_layouts.py (scan_nyuv2).
"""
from edgevl_jax.data import local_rgbd


class Builder(local_rgbd.LocalRgbdBuilder):
  """NYUv2 labelled scenes (27 scene types), RGB and depth files stored as encoded bytes."""

  DATASET = "nyuv2"
