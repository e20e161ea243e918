"""Job 'pseudo_labels': teacher zero-shot labels and curation (EdgeVL).

The frozen teacher labels every RGB train image against the dataset's
generic superset vocabulary (`vocabulary='published'`: the reference's
lists, written before the evaluation classes were chosen;
'dataset_classes' labels against the evaluation class names instead, which
hands the test taxonomy to curation and to the stage-2 positives):
p = softmax(100 cos(img, text)),
label = argmax p, confidence = max p. The most confident `kept_fraction` of
the split is kept (edgevl/curation.py). True labels are read only to report
the pseudo-label accuracy (analysis), never to select anything.
Writes WORKDIR/pseudo_labels.npz (see curation.py).
Report: pseudo_labels_path, pseudo_labels.{kept, accuracy_all,
accuracy_kept, kept_fraction, mean_confidence_kept}.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from edgevl_jax.edgevl import checks
from edgevl_jax.edgevl import curation
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import splits
from edgevl_jax.edgevl import zero_shot
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import metrics as metrics_lib
from edgevl_jax.run import runner

f = config_lib.field
VOCABULARIES = ("published", "dataset_classes")


def defaults() -> config_lib.Schema:
  return {
      **splits.DATA_SCHEMA,
      **handoff.TEACHER_SCHEMA,
      "image_size": f(224, "input side S"),
      "kept_fraction": f(0.5, "most confident fraction kept, in (0, 1]"),
      "vocabulary": f("published", f"one of {VOCABULARIES}: the "
                      "dataset's generic superset list, or its own class "
                      "names"),
      "prompt_ensemble": f(False, "all prompt templates instead of the "
                           "first"),
  }



def validate(config: Any) -> None:
  """Names the bad key before any compute."""
  checks.common_edgevl(config)
  checks.normalization(config, "teacher_normalization")
  config_lib.require(config, "vocabulary", allowed=VOCABULARIES)
  config_lib.require(config, "kept_fraction", types=float,
                     check=lambda v: 0 < v <= 1, expected="in (0, 1]")
  checks.teacher_folder(config)


def run(config: Any, ctx: runner.Context) -> dict[str, Any]:
  """Labels the train split with the teacher and keeps the confident part."""
  train_src = splits.load_source(config, "train")
  info = train_src.info
  model, params, tokenizer = handoff.load_teacher(config.teacher)
  templates = (info.prompt_templates if config.prompt_ensemble
               else info.prompt_templates[:1])
  vocab = list(info.superset_vocabulary if config.vocabulary == "published"
               else info.class_names)
  text = handoff.text_features(model, params, tokenizer, vocab, templates)
  norm = handoff.normalizer(config.teacher_normalization)
  encode = jax.jit(lambda x: model.apply({"params": params}, norm(x),
                                         method="encode_image"))
  emb = splits.embed_split({"teacher": encode}, train_src,
                           image_size=config.image_size,
                           batch_size=config.eval_batch_size,
                           modalities=("rgb",))
  probs = zero_shot.zero_shot_probabilities(emb["teacher"]["rgb"], text)
  order = np.argsort(emb["index"])  # rows by position in the split
  probs, true = probs[order], emb["label"][order]
  kept, labels, conf = curation.curate(probs, float(config.kept_fraction))
  names = np.asarray(vocab)
  correct = names[labels] == np.asarray(info.class_names)[true]
  if jax.process_index() == 0:
    curation.save(ctx.workdir, kept=kept, labels=labels, confidences=conf,
                  vocabulary=names)
  report = {"kept": int(len(kept)),
            "kept_fraction": float(config.kept_fraction),
            "accuracy_all": float(correct.mean()),
            "accuracy_kept": float(correct[kept].mean()),
            "mean_confidence_kept": float(conf[kept].mean())}
  with metrics_lib.MetricWriter(ctx.workdir, tensorboard=False,
                                progress=False) as writer:
    writer.write(0, report)
  return {"pseudo_labels_path": curation.OUTPUT_FILE,
          "pseudo_labels": report}
