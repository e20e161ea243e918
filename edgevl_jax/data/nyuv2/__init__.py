"""NYUv2 labelled scenes (27 scene types): TFDS builder over a local copy."""
from edgevl_jax.data.nyuv2.nyuv2_dataset_builder import Builder
