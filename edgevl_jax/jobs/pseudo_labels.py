"""Trainer 'pseudo_labels': teacher zero-shot labels and curation (EdgeVL).

The frozen teacher labels every RGB train image against the dataset's
generic superset vocabulary: p = softmax(100 cos(img, text)),
label = argmax p, confidence = max p. The most confident `kept_fraction` of
the split is kept for both stages. True labels are read only to report the
pseudo-label accuracy (analysis), never to select anything.

Config keys: dataset, data_dir, data_config, teacher (HF CLIP folder or a
clip_pretrain workdir), teacher_normalization, image_size, kept_fraction,
eval_batch_size, prompt_ensemble (bool: all templates instead of the first).
Writes WORKDIR/pseudo_labels.npz: indices (kept positions in the train split,
most confident first), labels, confidences (of the kept), vocabulary, and
all_labels / all_confidences (every train example).
Report: pseudo_labels_path, pseudo_labels.{kept, accuracy_all,
accuracy_kept, kept_fraction}.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from edgevl_jax.eval import artefacts
from edgevl_jax.eval import splits
from edgevl_jax.eval import zero_shot
from edgevl_jax.train import checks
from edgevl_jax.train import config_utils
from edgevl_jax.train import metrics as metrics_lib

OUTPUT_FILE = "pseudo_labels.npz"


def validate_config(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("dataset", "data_dir", "teacher"):
    config_utils.require(config, key, types=str)
  config_utils.require_positive(config, "image_size", integer=True)
  config_utils.require(config, "teacher_normalization",
                       allowed=("clip", "imagenet"))
  config_utils.require(config, "kept_fraction", types=float,
                       check=lambda v: 0 < v <= 1, expected="in (0, 1]")
  checks.dataset(config)
  checks.seed(config)
  checks.teacher_folder(config)
  checks.positive_ints(config, "eval_batch_size")


def curate(probabilities: np.ndarray, kept_fraction: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(kept indices most confident first, all labels, all confidences).

  Args:
    probabilities: (N, V) zero-shot probabilities over the vocabulary.
    kept_fraction: fraction of the N examples to keep (at least one).
  """
  labels = probabilities.argmax(-1).astype(np.int32)
  conf = probabilities.max(-1).astype(np.float32)
  keep = max(1, int(round(kept_fraction * len(conf))))
  order = np.argsort(-conf, kind="stable")[:keep]
  return order.astype(np.int64), labels, conf


def load(path: str) -> dict[str, np.ndarray]:
  """Reads a pseudo_labels.npz (path to the file or to its workdir)."""
  if os.path.isdir(path):
    path = os.path.join(path, OUTPUT_FILE)
  if not os.path.exists(path):
    raise ValueError(f"pseudo labels {path!r} not found; run the "
                     "pseudo_labels stage first and pass its workdir.")
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Labels the train split with the teacher and keeps the confident part."""
  validate_config(config)
  train_src = splits.load_source(config, "train")
  info = train_src.info
  model, params, tokenizer = artefacts.load_teacher(config.teacher)
  templates = (info.prompt_templates if config.get("prompt_ensemble", False)
               else info.prompt_templates[:1])
  vocab = list(info.superset_vocabulary)
  text = artefacts.text_features(model, params, tokenizer, vocab, templates)
  norm = artefacts.normalizer(config.teacher_normalization)
  encode = jax.jit(lambda x: model.apply({"params": params}, norm(x),
                                         method="encode_image"))
  emb = splits.embed_split({"teacher": encode}, train_src,
                           image_size=config.image_size,
                           batch_size=config.get("eval_batch_size", 256),
                           modalities=("rgb",))
  probs = zero_shot.zero_shot_probabilities(emb["teacher"]["rgb"], text)
  order = np.argsort(emb["index"])  # rows by position in the split
  probs, true = probs[order], emb["label"][order]
  kept, labels, conf = curate(probs, float(config.kept_fraction))
  names = np.asarray(vocab)
  true_names = np.asarray(info.class_names)[true]
  correct = names[labels] == true_names
  path = os.path.join(workdir, OUTPUT_FILE)
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, indices=kept, labels=labels[kept], confidences=conf[kept],
           all_labels=labels, all_confidences=conf, vocabulary=names)
  os.replace(tmp, path)
  report = {"kept": int(len(kept)), "kept_fraction": float(
      config.kept_fraction), "accuracy_all": float(correct.mean()),
            "accuracy_kept": float(correct[kept].mean()),
            "mean_confidence_kept": float(conf[kept].mean())}
  with metrics_lib.MetricWriter(workdir, tensorboard=False,
                                progress=False) as writer:
    writer.write(0, report)
  return {"pseudo_labels_path": OUTPUT_FILE, "pseudo_labels": report}
