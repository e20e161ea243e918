"""ScanNet every-100th-frame scenes (21 scene types): TFDS builder over a local copy."""
from edgevl_jax.data.scannet.scannet_dataset_builder import Builder
