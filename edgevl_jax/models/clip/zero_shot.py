"""CLIP zero-shot classification: class names and prompt templates -> weights.

    weights = clip.zero_shot_classifier(model, params, tokenizer, names,
                                        "a photo of a {}.")   # (C, D)
    logits = l2_normalize(model.apply(..., method='encode_image')) @ weights.T
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax.models.clip import model as model_lib
from edgevl_jax.models.clip.tokenizer import tokenize


@functools.lru_cache(maxsize=16)
def text_encoder(model: model_lib.CLIP) -> Callable[..., jax.Array]:
  """Jitted `(params, input_ids, attention_mask) -> (B, D)` text embeddings,
  cached per model so repeated classifiers compile once per batch shape."""
  return jax.jit(lambda p, i, m: model.apply({"params": p}, i, m,
                                             method="encode_text"))


def zero_shot_classifier(model: model_lib.CLIP, params: Any, tokenizer: Any,
                         class_names: Sequence[str],
                         templates: Sequence[str] | str, *,
                         max_length: int | None = None,
                         batch_size: int = 256) -> jax.Array:
  """CLIP prompt-ensembled zero-shot text classifier.

  Each "template.format(name)" prompt is embedded and L2-normalised; the
  prompts of a class are averaged over templates and L2-normalised again.

  Args:
    model, params: the teacher and its params.
    tokenizer: from `load_tokenizer`.
    class_names: C names.
    templates: T templates with one `{}`, e.g. "a photo of a {}.".
    max_length: token length (default: the text tower's position count).
    batch_size: prompts per forward pass (the last batch is padded so the
      jitted forward compiles once).

  Returns:
    (C, D) float32, rows of unit norm.
  """
  templates = [templates] if isinstance(templates, str) else list(templates)
  class_names = list(class_names)
  if not class_names or not templates:
    raise ValueError("zero_shot_classifier: class_names and templates must "
                     f"be non-empty, found {len(class_names)} names and "
                     f"{len(templates)} templates.")
  bad = [t for t in templates if "{}" not in t]
  if bad:
    raise ValueError(f"zero_shot_classifier: templates {bad} lack the '{{}}' "
                     "placeholder for the class name.")
  max_length = max_length or model.config.text.max_position_embeddings
  prompts = [t.format(name) for name in class_names for t in templates]
  ids, mask = tokenize(tokenizer, prompts, max_length=max_length)
  vocab_size = model.config.text.vocab_size
  if ids.size and int(ids.max()) >= vocab_size:
    raise ValueError(
        f"zero_shot_classifier: the tokenizer produced token id "
        f"{int(ids.max())} but the text tower has vocab_size={vocab_size} "
        "(ids must be < vocab_size; larger ones give NaN text features); use "
        "the tokenizer saved with the teacher (clip.load_tokenizer(folder)).")
  n = len(prompts)
  batch = min(batch_size, n)
  pad = (-n) % batch
  ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
  mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
  encode = text_encoder(model)
  emb = jnp.concatenate([
      model_lib.l2_normalize(encode(params, ids[s:s + batch], mask[s:s + batch]))
      for s in range(0, n + pad, batch)])[:n]
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return model_lib.l2_normalize(emb)

