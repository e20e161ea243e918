"""TFDS builder: ScanNet every-100th-frame scenes (21 scene types) from a local copy.

Point it at the folder of your copy (manual_dir); the expected layout is in
edgevl_jax/data/local_layouts.py (scan_scannet).
"""
from edgevl_jax.data import local_rgbd


class Builder(local_rgbd.LocalRgbdBuilder):
  """ScanNet every-100th-frame scenes (21 scene types), RGB and depth files stored as encoded bytes."""

  DATASET = "scannet"
