"""Flax CLIP: sharding, bfloat16, op injection, tokenizer, zero-shot, preprocess."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import NamedSharding, PartitionSpec as P

from edgevl_jax.models import clip, layers, preprocess

CORPUS = [
    "a photo of a cat.", "a photo of a dog.", "a depth image of a chair.",
    "a photo of a table in a kitchen.", "a bedroom with a bed and a lamp.",
    "a bathroom with a sink", "an office with a desk and a monitor",
]


def _config(vocab_size=1024, eos=1, width=32):
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=width,
                       intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16,
                       eos_token_id=eos, bos_token_id=0, pad_token_id=1),
      vision_config=dict(hidden_size=width, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8),
      projection_dim=16)


@pytest.fixture(scope="module", name="tiny")
def _tiny():
  model = clip.CLIP(_config())
  params = clip.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(2, 1000, (8, 12)).astype(np.int32)
  ids[:, 7:] = 1  # end-of-text, also the padding token
  mask = (np.arange(12) < 8).astype(np.int32)[None].repeat(8, 0)
  return model, params, images, ids, mask


def test_config_view_is_hashable_and_round_trips(tiny):
  model = tiny[0]
  assert isinstance(model.config, clip.CLIPSpec)
  hash(model)  # linen fields must be hashable (jit static args, clone)
  back = clip.CLIPSpec.from_hf(model.config.to_hf())
  assert back == model.config
  assert clip.CLIP(model.config.to_hf()).config.text.eos_token_id == 1


def test_params_are_float32_with_hf_names(tiny):
  _, params, *_ = tiny
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  v = params["vision_model"]
  assert v["embeddings"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 32)
  assert "bias" not in v["embeddings"]["patch_embedding"]
  assert set(v) == {"embeddings", "pre_layrnorm", "encoder", "post_layernorm"}
  assert set(v["encoder"]) == {"layers_0", "layers_1"}
  assert params["visual_projection"]["kernel"].shape == (32, 16)
  assert params["logit_scale"].shape == ()


def test_sharded_forward_equals_unsharded(tiny):
  model, params, images, ids, mask = tiny
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  specs = clip.param_logical_specs(model)
  shardings = nn.logical_to_mesh_sharding(specs, mesh,
                                          layers.LOGICAL_AXIS_RULES)
  kernel = shardings["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"][
      "kernel"]
  assert kernel.spec == P("fsdp", None)  # FSDP over the model width
  sharded = jax.device_put(params, shardings)
  assert len(sharded["text_model"]["embeddings"]["token_embedding"][
      "embedding"].addressable_shards) == 8
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  fn = jax.jit(model.apply, in_shardings=(
      {"params": shardings}, batch, batch, batch),
               out_shardings=NamedSharding(mesh, P()))
  got = fn({"params": sharded}, images, ids, mask)
  want = jax.jit(model.apply)({"params": params}, images, ids, mask)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5,
                               err_msg=key)


def test_bfloat16_compute_close_to_float32(tiny):
  model, params, images, ids, mask = tiny
  bf16 = clip.CLIP(model.config, dtype=jnp.bfloat16)

  @jax.jit
  def run(p):
    feats = bf16.apply({"params": p}, images, method="image_features")
    return (bf16.apply({"params": p}, images, method="encode_image"),
            bf16.apply({"params": p}, ids, mask, method="encode_text"),
            feats["stages"][0],
            model.apply({"params": p}, images, method="encode_image"),
            model.apply({"params": p}, ids, mask, method="encode_text"))

  img16, txt16, stage, img, txt = run(params)
  assert stage.dtype == jnp.bfloat16  # really computed in bf16
  assert img16.dtype == txt16.dtype == jnp.float32
  for low, ref in ((img16, img), (txt16, txt)):
    cos = np.sum(low * ref, -1) / (np.linalg.norm(low, axis=-1)
                                   * np.linalg.norm(ref, axis=-1))
    assert cos.min() > 0.99
    assert np.abs(low - ref).max() / np.abs(ref).max() < 0.1


def test_every_matmul_goes_through_injected_ops(tiny):
  model, params, images, ids, mask = tiny
  calls = {"dot": 0, "einsum": 0, "conv": 0}

  def dot_cls():
    def dot_general(lhs, rhs, dims, precision=None, **kw):
      calls["dot"] += 1
      return jax.lax.dot_general(lhs, rhs, dims, precision=precision, **kw)
    return dot_general

  def conv_cls():
    def conv(*args, **kw):
      calls["conv"] += 1
      return jax.lax.conv_general_dilated(*args, **kw)
    return conv

  class CountingEinsum(nn.Module):

    @nn.compact
    def __call__(self, eqn, lhs, rhs):
      calls["einsum"] += 1
      return jnp.einsum(eqn, lhs, rhs)

  ops = layers.Ops(dot_general_cls=dot_cls, einsum_cls=CountingEinsum,
                   conv_general_dilated_cls=conv_cls)
  counted = clip.CLIP(model.config, ops=ops)
  out = jax.jit(counted.apply)({"params": params}, images, ids, mask)
  # Per tower: 2 blocks x (q, k, v, out, fc1, fc2) + 1 projection.
  assert calls == {"dot": 26, "einsum": 8, "conv": 1}
  want = jax.jit(model.apply)({"params": params}, images, ids, mask)
  np.testing.assert_allclose(out["logits_per_image"],
                             want["logits_per_image"], rtol=1e-6)


def test_bad_image_shape_is_named(tiny):
  model, params, images, *_ = tiny
  with pytest.raises(ValueError, match=r"expected NHWC images \(B, 32, 32, 3\)"):
    model.apply({"params": params}, images[:, :16], method="encode_image")
  with pytest.raises(ValueError, match="image_size=64 differs"):
    clip.init_params(model, jax.random.key(0), image_size=64)


@pytest.fixture(scope="module", name="tokenizer_dir")
def _tokenizer_dir(tmp_path_factory):
  return clip.train_tokenizer(CORPUS * 3, tmp_path_factory.mktemp("tok"),
                              vocab_size=400)


def test_tokenizer_train_load_tokenize_round_trip(tokenizer_dir):
  tok = clip.load_tokenizer(tokenizer_dir)
  hf_tok = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  texts = ["A Photo of a  CAT.", "zebra quiz"]
  ids, mask = clip.tokenize(tok, texts, max_length=12)
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == (2, 12)
  ref = hf_tok(texts, padding="max_length", max_length=12)["input_ids"]
  np.testing.assert_array_equal(ids, np.asarray(ref))
  bos, eos = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
  assert (bos, eos) == (0, 1)
  assert (ids[:, 0] == bos).all()
  for row, m in zip(ids, mask):
    n = int(m.sum())
    assert row[n - 1] == eos and (row[n:] == eos).all()
    assert eos not in row[1:n - 1]  # no unknown tokens, even unseen endings
  # HF's CLIP decode turns every `</w>` into a space, as CLIP's own does.
  assert tok.decode(ids[0], skip_special_tokens=True) == "a photo of a cat ."
  # Common words became single tokens: the merges were learnt.
  assert tok.tokenize("photo") == ["photo</w>"]
  long_ids, _ = clip.tokenize(tok, ["a photo of " * 20], max_length=8)
  assert long_ids[0, 0] == bos and long_ids[0, -1] == eos


def test_load_tokenizer_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
    clip.load_tokenizer(tmp_path / "nope")


def test_zero_shot_classifier_ensembles_templates(tiny, tokenizer_dir):
  tok = clip.load_tokenizer(tokenizer_dir)
  model, params, *_ = tiny
  assert len(tok) <= model.config.text.vocab_size
  names = ["cat", "dog", "chair"]
  templates = ["a photo of a {}.", "a depth image of a {}."]
  zs = clip.zero_shot_classifier(model, params, tok, names, templates,
                                 batch_size=3)
  assert zs.shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(zs, axis=-1), 1.0, rtol=1e-5)
  single = [clip.zero_shot_classifier(model, params, tok, names, t,
                                      batch_size=3) for t in templates]
  mean = (single[0] + single[1]) / 2
  want = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
  np.testing.assert_allclose(zs, want, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(single[0]) - np.asarray(single[1])).max() > 1e-3
  ids, mask = clip.tokenize(tok, ["a photo of a dog."] * 3, max_length=16)
  direct = clip.text_encoder(model)(params, ids, mask)
  np.testing.assert_allclose(single[0][1], direct[0] / np.linalg.norm(direct[0]),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="placeholder"):
    clip.zero_shot_classifier(model, params, tok, names, ["a photo"])


def test_normalize():
  x = np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype(np.float32)
  got = preprocess.normalize(x)
  want = (x - np.array(preprocess.CLIP_MEAN)) / np.array(preprocess.CLIP_STD)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert isinstance(got, np.ndarray) and got.dtype == np.float32
  imnet = preprocess.normalize(jnp.asarray(x), kind="imagenet")
  assert isinstance(imnet, jax.Array)
  np.testing.assert_allclose(
      imnet[..., 0], (x[..., 0] - 0.485) / 0.229, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown kind 'laion'"):
    preprocess.normalize(x, kind="laion")
  with pytest.raises(ValueError, match=r"3 channels.*\(2, 4, 4, 1\)"):
    preprocess.normalize(x[..., :1])


def test_trained_tokenizer_is_deterministic(tmp_path):
  # HF's BPE trainer broke count ties in hash order (a new vocabulary per
  # process); ties now go to the smallest pair, so files are byte-identical.
  corpus = [f"a {c} {s} on a {f} floor." for c in ("red", "blue", "pink")
            for s in ("cube", "torus", "arch") for f in ("grey", "tiled")]
  files = []
  for i in range(2):
    path = clip.train_tokenizer(corpus * 3, tmp_path / str(i), vocab_size=330)
    files.append([open(os.path.join(path, n), "rb").read()
                  for n in ("vocab.json", "merges.txt")])
  assert files[0] == files[1]
  tok = clip.load_tokenizer(str(tmp_path / "0"))
  assert len(tok) >= 330  # merges learnt up to the requested size
  assert tok.tokenize("torus") == ["torus</w>"]
