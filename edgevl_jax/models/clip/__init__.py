"""The CLIP teacher (Radford et al. 2021), Hugging Face compatible.

    from edgevl_jax.models import clip
    clip.check_clip_folder(path)  # cheap: config, weight headers, tokenizer
    model, params = clip.load_pretrained(path)
    emb = model.apply({'params': params}, images, method='encode_image')
    tokenizer = clip.load_tokenizer(path)
    weights = clip.zero_shot_classifier(model, params, tokenizer, names,
                                        templates)

  config.py     CLIPSpec: frozen, hashable view of a transformers.CLIPConfig
  model.py      the Flax modules (HF parameter names), init and shardings
  convert.py    HF checkpoint <-> params, load_pretrained, save_pretrained
  folder.py     what a CLIP folder must hold, checked without loading weights
  tokenizer.py  load, tokenize, train a CLIP-format BPE
  zero_shot.py  prompt-ensembled zero-shot classifier

Modules import downwards only (config <- model <- convert; folder <-
tokenizer <- zero_shot); this file re-exports the public API.
"""
from edgevl_jax.models.clip.config import ACTIVATIONS
from edgevl_jax.models.clip.config import CLIPSpec
from edgevl_jax.models.clip.config import TextConfig
from edgevl_jax.models.clip.config import TowerConfig
from edgevl_jax.models.clip.config import VisionConfig
from edgevl_jax.models.clip.convert import load_config
from edgevl_jax.models.clip.convert import load_pretrained
from edgevl_jax.models.clip.convert import params_from_hf
from edgevl_jax.models.clip.convert import params_to_hf
from edgevl_jax.models.clip.convert import save_pretrained
from edgevl_jax.models.clip.folder import CLIP_FOLDER_CONTENTS
from edgevl_jax.models.clip.folder import check_clip_folder
from edgevl_jax.models.clip.folder import check_tokenizer_fits
from edgevl_jax.models.clip.model import CLIP
from edgevl_jax.models.clip.model import init_params
from edgevl_jax.models.clip.model import l2_normalize
from edgevl_jax.models.clip.model import param_logical_specs
from edgevl_jax.models.clip.model import param_shardings
from edgevl_jax.models.clip.tokenizer import load_tokenizer
from edgevl_jax.models.clip.tokenizer import tokenize
from edgevl_jax.models.clip.tokenizer import train_tokenizer
from edgevl_jax.models.clip.zero_shot import text_encoder
from edgevl_jax.models.clip.zero_shot import zero_shot_classifier

__all__ = [
    "ACTIVATIONS", "CLIP", "CLIPSpec", "CLIP_FOLDER_CONTENTS", "TextConfig",
    "TowerConfig", "VisionConfig", "check_clip_folder", "check_tokenizer_fits",
    "init_params", "l2_normalize", "load_config", "load_pretrained",
    "load_tokenizer", "param_logical_specs", "param_shardings",
    "params_from_hf", "params_to_hf", "save_pretrained", "text_encoder",
    "tokenize", "train_tokenizer", "zero_shot_classifier",
]
