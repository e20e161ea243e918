"""GhostNetV3 (ghostnetv3_100) against timm: train- and eval-mode parity,
re-parameterisation against the unfolded model and timm's own, the EdgeVL
student, and the int8 fold -> calibrate -> convert -> serve flow."""
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from edgevl_jax import quant
from edgevl_jax.export import size
from edgevl_jax.models import ghostnet
from edgevl_jax.models import students

SIDE = 64
TOL = 1e-4

# One bottleneck of each kind (stride 1 / 2, SE, DFC, identity shortcut),
# every stride to 32: a quick model with the four stage taps.
TINY_CFGS = (((3, 16, 16, 0.0, 1),), ((3, 48, 24, 0.0, 2),),
             ((5, 72, 40, 0.25, 2),), ((3, 240, 80, 0.0, 2),),
             ((5, 672, 160, 0.25, 2), (5, 960, 160, 0.0, 1)))


class _AnyMeta(type):
  """Classes whose every attribute is another such class."""

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    value = _AnyMeta(name, (), {"__init__": lambda self, *a, **k: None})
    setattr(cls, name, value)
    return value


class _StubModule(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    value = _AnyMeta(name, (), {"__init__": lambda self, *a, **k: None})
    setattr(self, name, value)
    return value


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """`import torchvision.*` -> empty placeholder modules."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname.split(".")[0] == "torchvision":
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _StubModule(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    pass


def _import_timm():
  """timm, also where torchvision is absent.

  timm imports torchvision at import time (data transforms,
  FrozenBatchNorm2d) but its GhostNet never uses it; the only torchvision
  wheels for this torch build are CUDA builds that fail to load on a CPU
  torch. So without torchvision, placeholders stand in for it.
  """
  if importlib.util.find_spec("torchvision") is None:
    sys.meta_path.insert(0, _TorchvisionStub())
  import timm  # pylint: disable=g-import-not-at-top
  from timm.utils.model import reparameterize_model  # pylint: disable=g-import-not-at-top
  return timm, reparameterize_model


def _randomise(model, seed=0):
  """Non-trivial BN affine params and running stats (timm inits 1 / 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
  return model


def _to_flax(flax_model, torch_model):
  x = jnp.zeros((1, SIDE, SIDE, 3), jnp.float32)
  abstract = jax.eval_shape(flax_model.init, jax.random.key(0), x)
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(
      {c: v for c, v in abstract.items() if c in ("params", "batch_stats")}))
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  values = ghostnet.convert_timm(
      state, {k: v.shape for k, v in flat.items()}, where="timm")
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v) for k, v in values.items()})


@pytest.fixture(scope="module")
def ref():
  timm, reparameterize_model = _import_timm()
  torch.manual_seed(0)
  model = _randomise(timm.create_model("ghostnetv3_100", drop_rate=0.0))
  flax_model = ghostnet.GhostNetV3(image_size=SIDE, num_classes=1000)
  variables = _to_flax(flax_model, model)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, SIDE, SIDE, 3)).astype(np.float32)
  return dict(model=model, flax_model=flax_model, variables=variables,
              images=images, reparameterize_model=reparameterize_model)


def _timm_out(model, images):
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    return pooled.numpy(), model.classifier(pooled).numpy()


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _eval_out(ref):
  """The unfolded Flax model in eval mode, computed once."""
  if "eval_out" not in ref:
    ref["eval_out"] = jax.jit(ref["flax_model"].apply)(
        ref["variables"], ref["images"])
  return ref["eval_out"]


def test_eval_mode_matches_timm(ref):
  model = ref["model"].eval()
  pooled, logits = _timm_out(model, ref["images"])
  out = _eval_out(ref)
  assert out["pooled"].shape == (4, 1280)
  # The last block at strides 4, 8, 16, 32.
  assert [s.shape[1:] for s in out["stages"]] == [
      (16, 16, 24), (8, 8, 40), (4, 4, 112), (2, 2, 160)]
  count = sum(np.size(v) for v in jax.tree.leaves(ref["variables"]["params"]))
  assert count == sum(p.numel() for p in model.parameters()) == 8_129_028
  assert _max_diff(out["pooled"], pooled) < TOL
  assert _max_diff(out["logits"], logits) < TOL
  assert np.std(logits) > 0.1  # not a trivially small output


def test_train_mode_matches_timm(ref):
  model = ref["model"]
  model.train()
  try:
    pooled, logits = _timm_out(model, ref["images"])
    stem_mean = model.bn1.running_mean.numpy().copy()
  finally:
    model.eval()
    # Put back the running stats the other tests use.
    _randomise(model)
  out, mutated = jax.jit(lambda v, x: ref["flax_model"].apply(
      v, x, train=True, mutable=["batch_stats"]))(
          ref["variables"], ref["images"])
  assert _max_diff(out["pooled"], pooled) < TOL
  assert _max_diff(out["logits"], logits) < TOL
  # Same running-mean update (PyTorch momentum 0.1 == flax 0.9).
  assert _max_diff(mutated["batch_stats"]["bn1"]["bn"]["mean"],
                   stem_mean) < 1e-5


def test_reparameterized_equals_unfolded_and_timm_deploy(ref):
  folded = ghostnet.reparameterize(ref["variables"])
  names = set(flax.traverse_util.flatten_dict(folded["params"]))
  assert not [k for k in names if any("rpr" in p for p in k)]
  assert ("blocks_1_0", "conv_dw", "bias") in names
  assert ("blocks_0_0", "ghost1", "cheap_operation", "kernel") in names
  deploy = ghostnet.GhostNetV3(image_size=SIDE, num_classes=1000,
                               deploy=True)
  out = jax.jit(deploy.apply)(folded, ref["images"])
  unfolded = _eval_out(ref)
  assert _max_diff(out["pooled"], unfolded["pooled"]) < TOL
  assert _max_diff(out["logits"], unfolded["logits"]) < TOL
  timm_deploy = ref["reparameterize_model"](ref["model"].eval())
  pooled, logits = _timm_out(timm_deploy, ref["images"])
  assert _max_diff(out["pooled"], pooled) < TOL
  assert _max_diff(out["logits"], logits) < TOL
  n_folded = sum(np.size(v) for v in jax.tree.leaves(folded["params"]))
  n_timm = sum(p.numel() for p in timm_deploy.parameters())
  assert n_folded == n_timm


def test_timm_mapping_names_the_problem(ref):
  flax_model = ghostnet.GhostNetV3(image_size=SIDE)
  state = {k: v.numpy() for k, v in ref["model"].state_dict().items()}
  del state["blocks.3.0.ghost1.short_conv.0.weight"]
  x = jnp.zeros((1, SIDE, SIDE, 3), jnp.float32)
  abstract = nn.meta.unbox(jax.eval_shape(flax_model.init, jax.random.key(0),
                                          x))
  flat = flax.traverse_util.flatten_dict(
      {c: abstract[c] for c in ("params", "batch_stats")})
  with pytest.raises(ValueError, match=r"blocks\.3\.0\.ghost1\.short_conv"):
    ghostnet.convert_timm(state, {k: v.shape for k, v in flat.items()},
                          where="timm")


def test_load_timm_folder_into_the_student(ref, tmp_path):
  state = {k: v.numpy() for k, v in ref["model"].state_dict().items()}
  safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps({
      "architecture": "ghostnetv3_100", "num_classes": 1000,
      "num_features": 960,
      "pretrained_cfg": {"input_size": [3, 224, 224]}}))
  model, variables = students.load_hf(str(tmp_path), embed_dim=16)
  assert model.backbone.width == 1.0 and model.image_size == 224
  assert set(variables["params"]["head"]) == {"proj", "norm"}
  loaded = flax.traverse_util.flatten_dict(nn.meta.unbox(
      {c: {k: v for k, v in variables[c].items() if k != "head"}
       for c in ("params", "batch_stats")}))
  loaded = {(c, *k): v for (c, _, *k), v in loaded.items()}
  want = flax.traverse_util.flatten_dict(
      {c: {k: v for k, v in ref["variables"][c].items() if k != "classifier"}
       for c in ("params", "batch_stats")})
  assert set(loaded) == set(want)
  assert all(np.array_equal(loaded[k], want[k]) for k in want)
  (tmp_path / "config.json").write_text(json.dumps(
      {"architecture": "ghostnetv2_100"}))
  with pytest.raises(ValueError, match="architecture='ghostnetv2_100'"):
    students.load_hf(str(tmp_path), embed_dim=16)


def test_student_head_and_features():
  tiny = dict(image_size=SIDE, width=0.25, cfgs=TINY_CFGS)
  model = students.build("ghostnetv3_100", embed_dim=24, **tiny)
  x = jax.ShapeDtypeStruct((2, SIDE, SIDE, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 24)
  feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"),
                         variables, x)
  assert [s.shape[1:] for s in feats["stages"]] == [
      (16, 16, 8), (8, 8, 12), (4, 4, 20), (2, 2, 40)]
  assert feats["pooled"].shape == (2, 1280)
  assert set(variables["params"]["head"]) == {"proj", "norm"}
  # The folded model also trains (QAT of what is served): shapes only.
  deploy = students.build("ghostnetv3_100", embed_dim=24, deploy=True,
                          quant=quant.int8(), **tiny)
  variables = jax.eval_shape(deploy.init, jax.random.key(0), x)
  emb, _ = jax.eval_shape(lambda v, x: deploy.apply(
      v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert emb.shape == (2, 24)


def _numpy_variables(model, x, seed=0):
  """Variables of `model` filled from numpy: BN scales and running stats
  away from their init (jitted random init compiles for minutes)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'bn'" in name and "bias" not in name and "'mean'" not in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(
      {c: abstract[c] for c in ("params", "batch_stats")}))


def test_too_small_input_is_named():
  model = ghostnet.GhostNetV3(image_size=32)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  with pytest.raises(ValueError, match="at least 64x64"):
    jax.eval_shape(model.init, jax.random.key(0), x)


def test_int8_served_equals_fake_quant_static_after_folding():
  # Four bottlenecks: stride 1 and 2 without DFC, then stride 2 and the
  # identity shortcut with SE and DFC (the flow compiles the model 4 times).
  cfgs = (((3, 16, 16, 0.0, 1),), ((3, 48, 24, 0.0, 2),),
          ((5, 72, 40, 0.25, 2), (5, 120, 40, 0.25, 1)))
  tiny = dict(image_size=32, width=0.25, head_features=32, cfgs=cfgs)
  fp32 = students.build("ghostnetv3_100", embed_dim=8, **tiny)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)),
                  jnp.float32)
  variables = _numpy_variables(fp32, x)
  folded = ghostnet.reparameterize(variables)
  deploy = students.build("ghostnetv3_100", embed_dim=8, deploy=True, **tiny)
  spec = quant.int8("static")
  build = lambda phase=None: students.build(
      "ghostnetv3_100", embed_dim=8, deploy=True,
      quant=spec if phase is None else spec.replace(phase=phase), **tiny)
  calib = jnp.concatenate([x, 2.0 * x[::-1]])
  folded = quant.calibrate(build("calibrate").apply, folded, [calib])
  # Op by op the served int8 model computes exactly the fake-quant codes.
  # (Jitted, XLA's fusions may round one rescale differently by an ulp and
  # flip one code downstream: 2e-4 on these logits with float-calibrated
  # ranges; so the exact check runs eagerly.)
  fake = build().apply(folded, x)
  served = quant.convert(build("convert").apply, folded, x)
  out = quant.serve_apply(build("serve").apply, served, x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(fake))
  fake = jax.jit(build().apply)(folded, x)
  ref = jax.jit(deploy.apply)(folded, x)
  assert _max_diff(fake, ref) > 1e-4  # quantisation did something
  rel = float(jnp.linalg.norm(fake - ref) / jnp.linalg.norm(ref))
  assert rel < 0.2, rel
  flat = flax.traverse_util.flatten_dict(served[quant.AQT_COLLECTION])
  ints = [v for k, v in flat.items() if k[-1].endswith("value")]
  assert all(v.dtype == jnp.int8 for v in ints)
  kernels = [k for k in flax.traverse_util.flatten_dict(
      nn.meta.unbox(folded["params"])) if k[-1] == "kernel"]
  assert len(ints) == len(kernels)  # every conv and Dense is int8
  params = flax.traverse_util.flatten_dict(nn.meta.unbox(served["params"]))
  assert not [k for k in params if k[-1] == "kernel"]
  # The size report serves the folded model: the same bytes.
  predicted = size.student_size("ghostnetv3_100", embed_dim=8, spec=spec,
                                **tiny)
  assert predicted["bytes_int8"] == quant.served_nbytes(served)["total"]
  assert predicted["quantised_weights"] == sum(np.size(v) for v in ints)
  assert predicted["params"] > sum(
      np.size(v) for v in jax.tree.leaves(folded["params"]))
