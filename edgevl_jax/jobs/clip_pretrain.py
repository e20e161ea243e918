"""Job 'clip_pretrain': contrastive image-text training of a CLIP.

Makes the demo's teacher: a small CLIP trained from scratch on RGB images and
their captions (synthetic_rgbd), with its own BPE tokenizer learnt from the
train captions. With `init_from` (an HF CLIP folder) it fine-tunes instead,
keeping that checkpoint's tokenizer. The result is written as a Hugging Face
CLIP folder (config.json + model.safetensors + tokenizer files) in
WORKDIR/teacher, so later stages `load_pretrained` it like a real checkpoint.

Loss (`loss`): 'unicl' (default) is UniCL (`losses.unicl_loss`): each
image's target is uniform over the batch texts of its class, and each text's
over the images of its class, so repeated class prompts are not negatives of
each other; with distinct labels it equals CLIP's loss. 'clip' is the plain
symmetric InfoNCE over the batch (diagonal = match). Both use the learnt
temperature exp(logit_scale) clipped at 100.

Report: teacher_path, clip_pretrain.{val_top1_rgb, val_top1_depth, loss}.
"""
from __future__ import annotations

import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from edgevl_jax import data as data_lib
from edgevl_jax import losses
from edgevl_jax.edgevl import checks
from edgevl_jax.edgevl import clip_teacher
from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import splits
from edgevl_jax.edgevl import zero_shot
from edgevl_jax.models import clip
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import runner

MAX_LOGIT_SCALE = float(np.log(100.0))
LOSSES = ("unicl", "clip")
f = config_lib.field


def defaults() -> config_lib.Schema:
  return {
      "dataset": f("synthetic_rgbd", "paired dataset with captions"),
      "data_dir": f("workdirs/tfds", "TFDS data folder"),
      "data_config": f("", "builder config"),
      "image_size": f(32, "input side S"),
      "batch_size": f(64, "image-text pairs per step (global)"),
      "num_steps": f(1000, "optimiser steps"),
      "optim": optim_lib.OPTIM_SCHEMA,
      "crop_scale": f((0.5, 1.0), "random resized crop scale range"),
      "normalization": f("clip", "input normalisation"),
      "init_from": f("", "HF CLIP folder to fine-tune ('' = from scratch)"),
      "prompt_fraction": f(0.0, "share of captions replaced by class "
                           "prompts"),
      "loss": f("unicl", f"one of {LOSSES}"),
      "model": clip_teacher.MODEL_SCHEMA,
  }



def validate(config: Any) -> None:
  """Names the bad key before any compute."""
  checks.common_edgevl(config)
  checks.positive_ints(config, "num_steps")
  checks.normalization(config, "normalization")
  config_lib.require(config, "prompt_fraction", types=float,
                     check=lambda v: 0 <= v <= 1, expected="in [0, 1]")
  config_lib.require(config, "loss", allowed=LOSSES)
  optim_lib.validate_optim_config(config.optim)
  checks.batch_fits_devices(config, minimum=2, what="image-text pairs")
  if config.init_from:
    checks.teacher_folder(config, "init_from")
  else:
    clip_teacher.validate_model(config)


def make_train_step(model: Any, norm: Any, loss_name: str = "clip"):
  """(state, batch) -> (state, metrics); batch: 'rgb' (B, S, S, 3) in
  [0, 1], 'input_ids' and 'attention_mask' (B, L), and 'label' (B,) for
  loss_name='unicl'."""

  def train_step(state, batch):
    def loss_fn(params):
      params = {**params, "logit_scale": jnp.minimum(
          params["logit_scale"], MAX_LOGIT_SCALE)}
      out = model.apply({"params": params}, norm(batch["rgb"]),
                        batch["input_ids"], batch["attention_mask"])
      if loss_name == "unicl":
        return losses.unicl_loss(logits_per_image=out["logits_per_image"],
                                 labels=batch["label"])
      return losses.clip_loss(logits_per_image=out["logits_per_image"])
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {
        "loss": loss, "logit_scale": jnp.exp(state.params["logit_scale"])}

  return train_step


class TextSampler:
  """The text of each image: its caption, or a class prompt.

  With probability `prompt_fraction` a caption is replaced by a random
  prompt template filled with the class name (what a web caption would say
  about the object), so the text tower ties the class name to the image
  instead of only the colour words that dominate the synthetic captions.
  The choices come from the batch's 'text_draw' (B, 2) uniforms, drawn per
  example by the loader from (seed, stream position): a resumed run and a
  run on any number of processes pick the same texts.
  """

  def __init__(self, info: Any, prompt_fraction: float):
    self.info, self.fraction = info, float(prompt_fraction)

  def __call__(self, batch: dict[str, Any]) -> list[str]:
    captions = [str(c) for c in batch["caption"]]
    if self.fraction <= 0:
      return captions
    draws = np.asarray(batch["text_draw"], np.float64)
    if draws.shape != (len(captions), 2):
      raise ValueError("batch['text_draw'] must be (B, 2) uniforms for B="
                       f"{len(captions)} captions; found {draws.shape}.")
    templates = self.info.prompt_templates
    out = []
    for caption, label, (u_prompt, u_template) in zip(
        captions, np.asarray(batch["label"]), draws):
      if u_prompt < self.fraction:
        t = templates[min(int(u_template * len(templates)),
                          len(templates) - 1)]
        out.append(t.format(self.info.class_names[int(label)]))
      else:
        out.append(caption)
    return out


def _captions(source: Any) -> list[str]:
  return [source[i]["caption"] for i in range(len(source))]


def _model_and_tokenizer(config: Any, train_src: Any, out_dir: str):
  """(model, initial params or None, tokenizer) from init_from or scratch."""
  info = train_src.info
  if config.init_from:
    folder = handoff.teacher_dir(config.init_from)
    model, init_params = clip.load_pretrained(folder)
    tokenizer = clip.load_tokenizer(folder)
    tokenizer.save_pretrained(out_dir)
    return model, init_params, tokenizer
  corpus = _captions(train_src) + [
      t.format(n) for n in info.superset_vocabulary
      for t in info.prompt_templates]
  # One process learns the BPE vocabulary and the others read its files
  # from the shared workdir, so every process tokenises alike.
  if jax.process_index() == 0:
    clip.train_tokenizer(corpus, out_dir, vocab_size=config.model.vocab_size,
                         model_max_length=config.model.max_length)
  multihost_utils.sync_global_devices("clip_pretrain: tokenizer written")
  tokenizer = clip.load_tokenizer(out_dir)
  model = clip.CLIP(config=clip_teacher.build_hf_config(
      config.model, image_size=config.image_size,
      vocab_size=max(len(tokenizer), config.model.vocab_size)))
  return model, None, tokenizer


def build(config: Any, ctx: runner.Context) -> runner.TrainSpec:
  """Trains the CLIP; saves it in HF format; reports val zero-shot top-1."""
  train_src = splits.load_source(config, "train")
  val_src = splits.load_source(config, "validation")
  info = train_src.info
  out_dir = os.path.join(ctx.workdir, handoff.TEACHER_DIR)
  model, init_params, tokenizer = _model_and_tokenizer(config, train_src,
                                                       out_dir)
  max_length = model.config.text.max_position_embeddings
  norm = handoff.normalizer(config.normalization)
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  ids = jnp.ones((1, max_length), jnp.int32)

  def init_fn(key):
    if init_params is not None:
      return {"params": init_params}
    return model.init(key, images, ids, ids)

  texts = TextSampler(info, config.prompt_fraction)

  def prepare(batch):
    ids_, mask_ = clip.tokenize(tokenizer, texts(batch), max_length=max_length)
    return mesh_lib.shard_batch(
        {"rgb": batch["rgb"], "input_ids": ids_, "attention_mask": mask_,
         "label": np.asarray(batch["label"], np.int32)}, ctx.mesh)

  def report(state, summary):
    params = jax.device_get(state.params)
    if jax.process_index() == 0:
      clip.save_pretrained(out_dir, model, params)
    multihost_utils.sync_global_devices("clip_pretrain: teacher saved")
    text = handoff.text_features(model, params, tokenizer, info.class_names,
                                 info.prompt_templates[:1])
    encode = jax.jit(lambda x: model.apply({"params": params}, norm(x),
                                           method="encode_image"))
    emb = splits.embed_split({"teacher": encode}, val_src,
                             image_size=config.image_size,
                             batch_size=config.eval_batch_size)
    acc = {m: zero_shot.topk_accuracy(emb["teacher"][m], text,
                                      emb["label"])["top1"]
           for m in ("rgb", "other")}
    return {"teacher_path": handoff.TEACHER_DIR,
            "clip_pretrain": {"val_top1_rgb": acc["rgb"],
                              f"val_top1_{info.other_modality}": acc["other"],
                              "loss": summary.get("loss")}}

  loader = data_lib.caption_loader(
      train_src, batch_size=mesh_lib.per_process_batch(config.batch_size),
      image_size=config.image_size, seed=config.seed,
      crop_scale=tuple(config.crop_scale))
  return runner.TrainSpec(
      init=init_fn, step=make_train_step(model, norm, config.loss),
      batches=iter(loader), num_steps=config.num_steps, prepare=prepare,
      report=report, title="CLIP pretraining")
