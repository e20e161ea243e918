"""edgevl_jax.data: paired-modality datasets and grain pipelines.

  info = get_info('synthetic_rgbd')              # class names, prompts, ...
  train = load_split('synthetic_rgbd', 'train', data_dir=DIR, config='demo')
  loader = pipeline.paired_loader(train, batch_size=32, image_size=32,
                                  train=True, seed=0, crop_scale=(0.5, 1.0))
  for batch in loader: ...  # {'rgb', 'other', 'label', 'index'} numpy

Batches are per-process numpy; the training side lays them on its mesh and
checkpoints the loader's iterator with its state (grain get_state /
set_state). data/ imports no training infrastructure.
"""
from edgevl_jax.data import pipeline
from edgevl_jax.data.info import DATASET_NAMES
from edgevl_jax.data.info import DatasetInfo
from edgevl_jax.data.info import get_info
from edgevl_jax.data.pipeline import caption_loader
from edgevl_jax.data.pipeline import embed_loader
from edgevl_jax.data.pipeline import paired_loader
from edgevl_jax.data.pipeline import SubsetSource
from edgevl_jax.data.pipeline import triplet_loader
from edgevl_jax.data.records import PairedSource
from edgevl_jax.data.sources import load_split
