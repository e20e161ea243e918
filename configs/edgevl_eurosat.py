r"""EdgeVL on eurosat with the paper's hyper-parameters.

  python -m edgevl_jax.main --config=configs/edgevl_eurosat.py:teacher=PATH \
      --workdir=DIR
  ...:student=vit_s16,teacher=PATH       other students (see STUDENTS)
  ...:student=vit_s16,student_hf=PATH,teacher=PATH
                                         start stage 1 from a Hugging Face
                                         ImageNet folder (e.g. a ViT-S/16)
  ...:runlocal                           tiny smoke run (needs the data)

teacher is a Hugging Face CLIP folder (config.json + model.safetensors).
Stage 1: AdamW 1e-4 cosine to 5e-6, wd 1e-3, clip 5, batch 32 pairs;
stage 2: 1e-6 cosine to 5e-7, batch 4 anchors; margin 0.3, 3 negatives.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common_edgevl as common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  return common.paper_config(arg, dataset="eurosat", kept_fraction=0.5)
