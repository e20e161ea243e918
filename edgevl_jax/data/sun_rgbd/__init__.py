"""SUN RGB-D scenes (19 scene classes): TFDS builder over a local copy."""
from edgevl_jax.data.sun_rgbd.sun_rgbd_dataset_builder import Builder
