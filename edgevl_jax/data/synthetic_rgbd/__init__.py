"""Synthetic RGB-D scenes: TFDS builder, renderer and class geometry."""
from edgevl_jax.data.synthetic_rgbd.synthetic_rgbd_dataset_builder import Builder
from edgevl_jax.data.synthetic_rgbd.synthetic_rgbd_dataset_builder import make_config
from edgevl_jax.data.synthetic_rgbd.synthetic_rgbd_dataset_builder import SyntheticRgbdConfig
