"""ONNX export of the DAT++ student (dat_t), tiny config: the fp32 graph
equals the Flax fp32 student, both int8 encodings equal the static fake-quant
int8 student, onnx.checker passes, ONNX Runtime runs the quantised matmuls /
convs on integer kernels, and the int8 file of the full 224-px dat_t is the
served int8 bytes (+10%)."""
import collections

import flax
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgevl_jax import quant
from edgevl_jax.export import onnx_export
from edgevl_jax.export import size as size_lib
from edgevl_jax.models import preprocess
from edgevl_jax.models import students

# tests/test_dat.py's TINY: maps 16, 8, 4, 2; 'N' at 16 and 4 (padded to the
# kernel 5), 'D' at 8 and 2 (2x2 reference points), rpe on.
TINY = dict(image_size=16, patch_size=2, dim_stem=16, dims=(16, 32, 32, 32),
            depths=(1, 1, 1, 1), stage_spec=("N", "D", "N", "D"),
            num_heads=(2, 4, 4, 4), groups=(1, 2, 2, 2),
            nat_kernels=(5, 5, 5, 5), mlp_ratio=2.0)
META = dict(name="dat_t", embed_dim=16, normalization="clip", overrides=TINY)
INTEGER_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul",
               "ConvInteger", "QLinearConv")


def _unit(e):
  e = np.asarray(e)
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def _cos(a, b):
  return float(np.min(np.sum(_unit(a) * _unit(b), axis=-1)))


@pytest.fixture(scope="module")
def student():
  s = TINY["image_size"]
  rng = np.random.default_rng(0)
  build = lambda q=None: students.build("dat_t", embed_dim=16, quant=q, **TINY)
  v = jax.jit(build().init)(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))
  v = {"params": v["params"]}
  # Trained-looking tables: the init's 0.01-0.02 biases would hide a
  # misplaced bias or sampled position.
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: (a + jnp.asarray(rng.normal(0, 0.5, a.shape), jnp.float32)
                    if jax.tree_util.keystr(p).endswith(("rpb']",
                                                         "rpe_table']"))
                    else a), v)
  images = rng.uniform(size=(6, s, s, 3)).astype(np.float32)
  x = preprocess.normalize(jnp.asarray(images), "clip")
  spec = quant.int8(calibration="static")
  calibrated = quant.calibrate(build(spec.replace(phase="calibrate")).apply,
                               v, [x])
  outputs = []
  convert = build(spec.replace(phase="convert"))

  def apply(variables, x, mutable=False):
    result = jax.jit(lambda v, x: convert.apply(v, x, mutable=mutable))(
        variables, x)
    outputs.append(result[0] if mutable else result)
    return result

  served = quant.convert(apply, calibrated, x)
  served = jax.tree.map(np.asarray, flax.core.unfreeze(
      flax.linen.meta.unbox(served)))
  fp32 = jax.jit(build().apply)(v, x)
  return dict(params=v, served=served, images=images, fp32=_unit(fp32),
              fake_quant=_unit(outputs[0]))


def _run(model, images, optimized=None):
  opts = ort.SessionOptions()
  opts.log_severity_level = 3
  if optimized:
    opts.optimized_model_filepath = optimized
  session = ort.InferenceSession(model.SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"])
  return session.run(None, {"images": images})[0]


def test_fp32_graph_equals_flax(student):
  model = onnx_export.student_onnx(META, student["params"])
  onnx.checker.check_model(model, full_check=True)
  out = _run(model, student["images"])
  assert out.shape == (6, 16)
  print("fp32 cos", _cos(out, student["fp32"]), "max abs",
        np.abs(out - student["fp32"]).max())
  assert _cos(out, student["fp32"]) >= 0.99999
  assert np.abs(out - student["fp32"]).max() < 1e-5


@pytest.mark.parametrize("encoding", ["s8s8", "u8"])
def test_int8_graph_equals_fake_quant(student, encoding, tmp_path):
  """Measured cosine 0.99963 (max abs 0.014): this random tiny DAT is far
  noisier under int8 than the other families' tiny configs (fake-quant vs
  fp32 cosine ~0.998 with only 'N' blocks, ~0.986 with only 'D' blocks, vs
  0.99984 for the tiny Swin), and the ONNX-vs-fake-quant gap stays a small
  fraction of that noise (0.03-0.24 of 1 - cos(fq, fp32), Swin 0.19): one-code
  rounding flips where XLA and ORT order float ops differently, amplified by
  the offsets (sampling positions) - not a systematic error. The bound is
  the brief's 0.999, not loosened."""
  model = onnx_export.student_onnx(META, student["served"], encoding=encoding)
  onnx.checker.check_model(model, full_check=True)
  optimized = str(tmp_path / "optimized.onnx")
  out = _run(model, student["images"], optimized)
  print(encoding, "cos", _cos(out, student["fake_quant"]), "max abs",
        np.abs(out - student["fake_quant"]).max())
  assert _cos(out, student["fake_quant"]) >= 0.999
  ops = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
  # Every Dense and both attention matmuls of both attentions run on
  # integers; the depthwise / stem convs too.
  assert ops["MatMul"] + ops["FusedMatMul"] == 0, ops
  assert sum(ops[k] for k in INTEGER_OPS) >= 20, ops
  assert ops["GridSample"] >= 2, ops  # sampling stays float
  dtype = onnx.TensorProto.UINT8 if encoding == "u8" else onnx.TensorProto.INT8
  zps = [i for i in model.graph.initializer if i.name.startswith("zp_")]
  assert [z.data_type for z in zps] == [dtype]


def test_int8_file_size_is_the_served_size():
  """Full 224-px dat_t: the int8 ONNX file is the served int8 bytes (+10%).

  Served variables with the shapes and dtypes of `quant.convert` (from
  `jax.eval_shape` of the serve model) and placeholder values, as
  test_onnx_export's size test.
  """
  meta = dict(name="dat_t", embed_dim=512, normalization="clip", overrides={})
  serve = students.build("dat_t", embed_dim=512, quant=quant.int8(
      calibration="static", phase="serve"))
  shapes = quant.drop_frozen_kernels(jax.eval_shape(
      serve.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  shapes = {k: v for k, v in shapes.items()
            if k in ("params", "batch_stats", "aqt", "quant_stats")}
  served = jax.tree.map(lambda a: np.ones(a.shape, a.dtype),
                        flax.linen.meta.unbox(shapes))
  model = onnx_export.student_onnx(meta, served, encoding="u8")
  served_bytes = size_lib.model_size(served)["bytes"]
  onnx_bytes = len(model.SerializeToString())
  print("dat_t int8 onnx", onnx_bytes, "served", served_bytes)
  assert abs(onnx_bytes - served_bytes) <= 0.10 * served_bytes, (
      onnx_bytes, served_bytes)
  int8_codes = sum(len(i.raw_data) for i in model.graph.initializer
                   if i.data_type == onnx.TensorProto.INT8)
  assert int8_codes >= 0.5 * onnx_bytes  # the weights are int8 on disk


def test_u8_and_s8s8_hold_the_same_codes(student):
  outs = [_run(onnx_export.student_onnx(META, student["served"], encoding=e),
               student["images"]) for e in ("s8s8", "u8")]
  assert _cos(outs[0], outs[1]) >= 0.99999
