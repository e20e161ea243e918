"""Trainer 'clip_pretrain': contrastive image-text training of a CLIP.

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

Config keys: dataset, data_dir, data_config, image_size, seed, batch_size,
num_steps, optim, crop_scale, normalization ('clip'), init_from (optional),
prompt_fraction (share of captions replaced by class prompts, default 0),
loss ('unicl' | 'clip', default 'unicl'),
model.{vision_width, vision_layers, vision_heads, patch_size, text_width,
text_layers, text_heads, projection_dim, max_length, vocab_size,
hidden_act}, eval_batch_size, log_every, ckpt_every.
Report: teacher_path, clip_pretrain.{val_top1_rgb, val_top1_depth, loss}.
"""
from __future__ import annotations

import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from edgevl_jax.eval import artefacts
from edgevl_jax.eval import splits
from edgevl_jax.eval import zero_shot
from edgevl_jax import data as data_lib
from edgevl_jax import losses
from edgevl_jax.models import clip
from edgevl_jax.train import checkpoint as checkpoint_lib
from edgevl_jax.train import checks
from edgevl_jax.train import config_utils
from edgevl_jax.train import loop
from edgevl_jax.train import mesh as mesh_lib
from edgevl_jax.train import metrics as metrics_lib
from edgevl_jax.train import state as state_lib

MAX_LOGIT_SCALE = float(np.log(100.0))
LOSSES = ("unicl", "clip")
MODEL_KEYS = ("vision_width", "vision_layers", "vision_heads", "patch_size",
              "text_width", "text_layers", "text_heads", "projection_dim",
              "max_length", "vocab_size", "hidden_act")


def validate_config(config: Any) -> None:
  """Names the bad key before any compute."""
  for key in ("dataset", "data_dir"):
    config_utils.require(config, key, types=str)
  for key in ("image_size", "batch_size", "num_steps"):
    config_utils.require_positive(config, key, integer=True)
  config_utils.require(config, "normalization", allowed=("clip", "imagenet"))
  frac = config.get("prompt_fraction", 0.0)
  if not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
    raise ValueError(f"config.prompt_fraction must be in [0, 1], found "
                     f"{frac!r}.")
  if config.get("loss", "unicl") not in LOSSES:
    raise ValueError(f"config.loss must be one of {list(LOSSES)}, found "
                     f"{config.get('loss')!r}.")
  state_lib.validate_optim_config(config.optim)
  checks.dataset(config)
  checks.seed(config)
  checks.batch_fits_devices(config, minimum=2, what="image-text pairs")
  if config_utils.get(config, "eval_batch_size") is not None:
    checks.positive_ints(config, "eval_batch_size")
  if config_utils.get(config, "init_from"):
    checks.teacher_folder(config, "init_from")
  if not config_utils.get(config, "init_from"):
    model = config_utils.require(config, "model")
    unknown = sorted(set(model.keys()) - set(MODEL_KEYS))
    if unknown:
      raise ValueError(f"config.model has unknown keys {unknown}; allowed: "
                       f"{list(MODEL_KEYS)}.")
    for key in MODEL_KEYS:
      if key != "hidden_act":
        config_utils.require_positive(config, f"model.{key}", integer=True)
    if config.image_size % config.model.patch_size:
      raise ValueError(
          f"config.image_size={config.image_size} must be a multiple of "
          f"config.model.patch_size={config.model.patch_size}.")


def build_hf_config(m: Any, *, image_size: int, vocab_size: int) -> Any:
  """A `transformers.CLIPConfig` for the tiny from-scratch teacher."""
  import transformers  # pylint: disable=g-import-not-at-top
  act = m.get("hidden_act", "gelu")
  return transformers.CLIPConfig(
      text_config=dict(
          vocab_size=vocab_size, hidden_size=m.text_width,
          intermediate_size=4 * m.text_width,
          num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
          max_position_embeddings=m.max_length, hidden_act=act,
          bos_token_id=0, eos_token_id=1, pad_token_id=1),
      vision_config=dict(
          hidden_size=m.vision_width, intermediate_size=4 * m.vision_width,
          num_hidden_layers=m.vision_layers,
          num_attention_heads=m.vision_heads, image_size=image_size,
          patch_size=m.patch_size, hidden_act=act),
      projection_dim=m.projection_dim)


def clip_loss(logits_per_image: jax.Array) -> jax.Array:
  """Symmetric cross-entropy of (B, B) image-text logits (diagonal = match)."""
  labels = jnp.arange(logits_per_image.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (ce(logits_per_image, labels).mean()
                + ce(logits_per_image.T, labels).mean())


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
      return clip_loss(out["logits_per_image"])
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


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains the CLIP, saves it in HF format, reports val zero-shot top-1."""
  validate_config(config)
  mesh = mesh_lib.make_mesh(config_utils.get(config, "mesh", None))
  train_src = splits.load_source(config, "train")
  val_src = splits.load_source(config, "validation")
  info = train_src.info
  out_dir = os.path.join(workdir, artefacts.TEACHER_DIR)
  init_from = config_utils.get(config, "init_from")
  if init_from:
    folder = artefacts.teacher_dir(init_from)
    model, init_params = clip.load_pretrained(folder)
    tokenizer = clip.load_tokenizer(folder)
    tokenizer.save_pretrained(out_dir)
  else:
    corpus = _captions(train_src) + [
        t.format(n) for n in info.superset_vocabulary
        for t in info.prompt_templates]
    # BPE training (HF tokenizers) breaks count ties in hash order, which
    # differs between processes: one process trains, the others read its
    # files from the shared workdir, so every process tokenises alike.
    if jax.process_index() == 0:
      clip.train_tokenizer(corpus, out_dir,
                           vocab_size=config.model.vocab_size,
                           model_max_length=config.model.max_length)
    multihost_utils.sync_global_devices("clip_pretrain: tokenizer written")
    tokenizer = clip.load_tokenizer(out_dir)
    model = clip.CLIP(config=build_hf_config(
        config.model, image_size=config.image_size,
        vocab_size=max(len(tokenizer), config.model.vocab_size)))
    init_params = None
  max_length = model.config.text.max_position_embeddings
  norm = artefacts.normalizer(config.normalization)

  tx = state_lib.make_optimizer(config.optim, config.num_steps)
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  ids = jnp.ones((1, max_length), jnp.int32)

  def init_fn(key):
    if init_params is not None:
      return {"params": init_params}
    return model.init(key, images, ids, ids)

  state, state_sh = state_lib.create_train_state(
      init_fn, tx, jax.random.key(config.seed), mesh=mesh)
  batch_sh = mesh_lib.batch_sharding(mesh)

  train_step = make_train_step(model, norm, config.get("loss", "unicl"))

  step = mesh_lib.jit_sharded(
      train_step, in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, mesh_lib.replicated(mesh)), donate_argnums=0)

  texts = TextSampler(info, config.get("prompt_fraction", 0.0))

  def prepare(batch):
    ids_, mask_ = clip.tokenize(tokenizer, texts(batch), max_length=max_length)
    return mesh_lib.shard_batch({"rgb": batch["rgb"], "input_ids": ids_,
                                 "attention_mask": mask_,
                                 "label": np.asarray(batch["label"], np.int32)},
                                mesh)

  loader = data_lib.caption_loader(
      train_src, batch_size=mesh_lib.per_process_batch(config.batch_size),
      image_size=config.image_size, seed=config.seed,
      crop_scale=tuple(config.crop_scale))
  batches = iter(loader)
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.get("max_to_keep", checkpoint_lib.DEFAULT_MAX_TO_KEEP)) as ckpt, \
      metrics_lib.MetricWriter(workdir, total_steps=config.num_steps) as w:
    state, summary = loop.fit(
        state, step, batches, num_steps=config.num_steps, checkpointer=ckpt,
        writer=w, log_every=config.get("log_every", 50),
        ckpt_every=config.get("ckpt_every", None), prepare_batch=prepare)
  params = jax.device_get(state.params)
  clip.save_pretrained(out_dir, model, params)

  text = artefacts.text_features(model, params, tokenizer, info.class_names,
                                 info.prompt_templates[:1])
  encode = jax.jit(lambda x: model.apply({"params": params}, norm(x),
                                         method="encode_image"))
  emb = splits.embed_split({"teacher": encode}, val_src,
                           image_size=config.image_size,
                           batch_size=config.get("eval_batch_size", 256))
  acc = {m: zero_shot.topk_accuracy(emb["teacher"][m], text,
                                    emb["label"])["top1"]
         for m in ("rgb", "other")}
  metrics_lib.plot_curves(os.path.join(workdir, metrics_lib.METRICS_FILE),
                          os.path.join(workdir, "loss.png"),
                          title="CLIP pretraining")
  return {"teacher_path": artefacts.TEACHER_DIR,
          "clip_pretrain": {"val_top1_rgb": acc["rgb"],
                            f"val_top1_{info.other_modality}": acc["other"],
                            "loss": summary.get("loss")}}
