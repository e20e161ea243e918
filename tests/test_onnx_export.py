"""ONNX edge export: parity with the Flax fp32 and fake-quant int8 students.

Per family (tiny configs): the fp32 graph equals the Flax fp32 student, both
int8 encodings equal the project's static fake-quant int8 student, the graph
passes onnx.checker, ONNX Runtime's optimised graph runs the matmuls / convs
as integer kernels, and the int8 file is the served int8 bytes (+10%).
Then the artefact folder: JAX-free prediction in a subprocess and the
one-line errors for a bad folder or input.
"""
import collections
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from edgevl_jax import quant
from edgevl_jax.export import edge_predict
from edgevl_jax.export import onnx_export
from edgevl_jax.export import size as size_lib
from edgevl_jax.models import preprocess
from edgevl_jax.models import students

# Tiny configs with enough width that the weights, not the graph, dominate
# the file (the size check); each still has every block kind of its family.
FAMILIES = {
    "vit": ("vit_ti16", dict(image_size=16, patch_size=4, width=96, depth=2,
                             num_heads=2)),
    "swin": ("swin_t", dict(image_size=32, patch_size=2, width=32,
                            depths=(2, 2), num_heads=(2, 4), window_size=4)),
    "resnet": ("resnet18", dict(image_size=32, stage_sizes=(1, 1),
                                widths=(32, 64), stem_width=32)),
    "mobilenet": ("mobilenet_v2", dict(image_size=32, width=0.5)),
}
INTEGER_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul",
               "ConvInteger", "QLinearConv")
CLASSES = ["chair", "table", "bed"]


def _meta(family):
  name, overrides = FAMILIES[family]
  return dict(name=name, embed_dim=16, normalization="clip",
              overrides=overrides)


def _jit_apply(model, outputs=None):
  """model.apply, jitted (eager AQT is slow op by op); `mutable` static.

  `outputs` (a list) receives each call's model output: the convert phase
  computes the fake-quant forward, so its output is the int8 reference
  without compiling the model once more.
  """
  fns = {}

  def apply(variables, x, mutable=False):
    key = tuple(mutable) if isinstance(mutable, (list, tuple)) else mutable
    if key not in fns:
      fns[key] = jax.jit(lambda v, x: model.apply(v, x, mutable=mutable))
    result = fns[key](variables, x)
    if outputs is not None:
      outputs.append(result[0] if mutable else result)
    return result

  return apply


def _unit(e):
  e = np.asarray(e)
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def student(request):
  """Float variables, static-calibrated served variables and references."""
  family = request.param
  name, ov = FAMILIES[family]
  s = ov["image_size"]
  rng = np.random.default_rng(0)
  build = lambda q=None: students.build(name, embed_dim=16, quant=q, **ov)
  v = jax.jit(build().init)(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))
  v = {k: v[k] for k in ("params", "batch_stats") if k in v}
  if "batch_stats" in v:  # trained-looking BN statistics, not 0 / 1
    v["batch_stats"] = jax.tree.map(
        lambda a: a + jnp.asarray(rng.uniform(0.1, 0.5, a.shape), jnp.float32),
        v["batch_stats"])
  images = rng.uniform(size=(6, s, s, 3)).astype(np.float32)
  x = preprocess.normalize(jnp.asarray(images), "clip")
  spec = quant.int8(calibration="static")
  calibrated = quant.calibrate(build(spec.replace(phase="calibrate")).apply,
                               v, [x])
  fake_quant = []  # convert's forward is the static fake-quant model
  served = quant.convert(
      _jit_apply(build(spec.replace(phase="convert")), fake_quant),
      calibrated, x)
  served = jax.tree.map(np.asarray, flax.core.unfreeze(
      flax.linen.meta.unbox(served)))
  return dict(family=family, meta=_meta(family), params=v, served=served,
              images=images, fp32=_unit(_jit_apply(build())(v, x)),
              fake_quant=_unit(fake_quant[0]))


def _run(model, images, optimized=None):
  opts = ort.SessionOptions()
  opts.log_severity_level = 3
  if optimized:
    opts.optimized_model_filepath = optimized
  session = ort.InferenceSession(model.SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"])
  return session.run(None, {"images": images})[0]


def _cos(a, b):
  return float(np.min(np.sum(_unit(a) * _unit(b), axis=-1)))


def test_fp32_graph_equals_flax(student):
  model = onnx_export.student_onnx(student["meta"], student["params"])
  onnx.checker.check_model(model, full_check=True)
  out = _run(model, student["images"])
  assert out.shape == (6, 16)
  assert _cos(out, student["fp32"]) >= 0.99999
  assert np.abs(out - student["fp32"]).max() < 1e-5


@pytest.mark.parametrize("encoding", ["s8s8", "u8"])
def test_int8_graph_equals_fake_quant(student, encoding, tmp_path):
  model = onnx_export.student_onnx(student["meta"], student["served"],
                                   encoding=encoding)
  onnx.checker.check_model(model, full_check=True)
  assert model.opset_import[0].version >= 21
  optimized = str(tmp_path / "optimized.onnx")
  out = _run(model, student["images"], optimized)
  assert _cos(out, student["fake_quant"]) >= 0.999
  ops = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
  integer = sum(ops[k] for k in INTEGER_OPS)
  if student["family"] in ("vit", "swin"):
    # Every Dense and both attention matmuls run on integers.
    assert ops["MatMul"] + ops["FusedMatMul"] == 0, ops
    assert integer >= 5, ops
  else:
    assert ops["QLinearConv"] >= 1, ops
  # Activations are stored in the encoding's integer type.
  dtype = onnx.TensorProto.UINT8 if encoding == "u8" else onnx.TensorProto.INT8
  zps = [i for i in model.graph.initializer if i.name.startswith("zp_")]
  assert [z.data_type for z in zps] == [dtype]


def test_u8_and_s8s8_hold_the_same_codes(student):
  """The two encodings are one set of codes: identical outputs."""
  outs = [_run(onnx_export.student_onnx(student["meta"], student["served"],
                                        encoding=e), student["images"])
          for e in ("s8s8", "u8")]
  assert _cos(outs[0], outs[1]) >= 0.99999


def test_openvino_runs_the_cnn_graphs(student, tmp_path):
  """OpenVINO (optional runtime for the CNN students) on the same files."""
  ov = pytest.importorskip("openvino")
  if student["family"] not in ("resnet", "mobilenet"):
    pytest.skip("OpenVINO is the optional runtime of the CNN students")
  core = ov.Core()
  for kind, variables, ref in (
      (None, student["params"], student["fp32"]),
      ("u8", student["served"], student["fake_quant"])):
    path = str(tmp_path / f"{kind}.onnx")
    with open(path, "wb") as f:
      f.write(onnx_export.student_onnx(student["meta"], variables,
                                       encoding=kind).SerializeToString())
    # f32: OpenVINO may otherwise pick bf16 for the float parts.
    compiled = core.compile_model(core.read_model(path), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    out = np.asarray(compiled.create_infer_request().infer(
        {"images": student["images"]})["embedding"])
    assert _cos(out, ref) >= (0.99999 if kind is None else 0.999)


@pytest.mark.parametrize("name", ["vit_ti16", "vit_s16", "vit_b16", "swin_t",
                                  "swin_t_edgevl", "swin_s", "resnet18",
                                  "resnet34", "mobilenet_v2"])
def test_int8_file_size_is_the_served_size(name):
  """Full 224-px students: the int8 ONNX file is the served int8 bytes.

  Served variables with the shapes and dtypes of `quant.convert` (from
  `jax.eval_shape` of the serve model, no forward pass) and placeholder
  values: file size does not depend on the values.
  """
  meta = dict(name=name, embed_dim=512, normalization="clip", overrides={})
  serve = students.build(name, embed_dim=512, quant=quant.int8(
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
  assert abs(onnx_bytes - served_bytes) <= 0.10 * served_bytes, (
      onnx_bytes, served_bytes)
  int8_codes = sum(len(i.raw_data) for i in model.graph.initializer
                   if i.data_type == onnx.TensorProto.INT8)
  assert int8_codes >= 0.5 * onnx_bytes  # the weights are int8 on disk


# ----- the artefact folder -----------------------------------------------------
@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
  """A ViT ONNX artefact folder and a folder of 3 images."""
  family = "vit"
  name, ov = FAMILIES[family]
  s = ov["image_size"]
  meta = _meta(family)
  build = lambda q=None: students.build(name, embed_dim=16, quant=q, **ov)
  v = build().init(jax.random.PRNGKey(1), jnp.zeros((1, s, s, 3)))
  v = {"params": v["params"]}
  rng = np.random.default_rng(1)
  x = preprocess.normalize(jnp.asarray(rng.uniform(size=(4, s, s, 3)),
                                       jnp.float32), "clip")
  spec = quant.int8(calibration="static")
  cal = quant.calibrate(build(spec.replace(phase="calibrate")).apply, v, [x])
  served = quant.convert(_jit_apply(build(spec.replace(phase="convert"))),
                         cal, x[:1])
  out = str(tmp_path_factory.mktemp("onnx_artefact"))
  manifest = onnx_export.export_onnx(
      out, meta=meta, params=v, served=served,
      text_features=rng.normal(size=(len(CLASSES), 16)), class_names=CLASSES)
  images = str(tmp_path_factory.mktemp("images"))
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)).save(
        os.path.join(images, f"img{i}.png"))
  return out, images, manifest


def test_artefact_files_and_manifest(artefact):
  out, _, manifest = artefact
  assert sorted(os.listdir(out)) == sorted(
      [*onnx_export.FILES.values(), "text_features.npy", "manifest.json"])
  for name, entry in manifest["files"].items():
    assert os.path.getsize(os.path.join(out, name)) == entry["bytes"]
    assert len(entry["sha256"]) == 64
  assert manifest["bytes"]["onnx_int8"] < manifest["bytes"]["onnx_fp32"]
  text = np.load(os.path.join(out, "text_features.npy"))
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, atol=1e-5)


_BLOCK_JAX = """
import sys
class _NoJax:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'aqt'):
      raise ImportError('importing ' + name + ' on the ONNX predictor path')
sys.meta_path.insert(0, _NoJax())
from edgevl_jax.export import predict
code = predict.main(sys.argv[1:])
assert not any(m.split('.')[0] in ('jax', 'flax') for m in sys.modules)
sys.exit(code)
"""


def test_onnx_predictor_runs_without_jax(artefact):
  out, images, _ = artefact
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for model in ("int8_u8", "int8_s8s8", "fp32"):
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCK_JAX, f"--artifact={out}",
         f"--images={images}", f"--model={model}"],
        capture_output=True, text=True, cwd=repo, timeout=120,
        env={**os.environ, "PYTHONPATH": repo})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [l.split("\t")[0] for l in lines] == [f"img{i}.png" for i in range(3)]
    assert all(l.split("\t")[1] in CLASSES for l in lines)
  # The in-process predictor gives the same classes as the CLI.
  model = edge_predict.load(out, model="int8_u8")
  imgs = np.stack([np.asarray(Image.open(os.path.join(images, f"img{i}.png")))
                   for i in range(3)])
  _, classes = model(imgs)
  assert [CLASSES[c] for c in classes] == [l.split("\t")[1] for l in lines]


def _copy(src, dst):
  os.makedirs(dst)
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f:
      data = f.read()
    with open(os.path.join(dst, name), "wb") as f:
      f.write(data)
  return dst


def test_missing_file_is_named(artefact, tmp_path):
  bad = _copy(artefact[0], str(tmp_path / "a"))
  os.remove(os.path.join(bad, "student_int8_u8.onnx"))
  with pytest.raises(ValueError, match=r"missing student_int8_u8\.onnx"):
    edge_predict.load(bad)
  os.remove(os.path.join(bad, "manifest.json"))
  with pytest.raises(ValueError, match="no manifest.json"):
    edge_predict.load(bad)


def test_truncated_onnx_is_a_sha256_mismatch(artefact, tmp_path, capsys):
  bad = _copy(artefact[0], str(tmp_path / "a"))
  path = os.path.join(bad, "student_int8_s8s8.onnx")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"student_int8_s8s8\.onnx: sha256 "
                     "does not match"):
    edge_predict.load(bad, model="int8_s8s8")
  from edgevl_jax.export import predict
  assert predict.main([f"--artifact={bad}", f"--images={artefact[1]}",
                       "--model=int8_s8s8"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "sha256" in err[0]


def test_wrong_image_size_or_channels_is_named(artefact):
  model = edge_predict.load(artefact[0])
  s = model.image_size
  with pytest.raises(ValueError, match="wrong image size"):
    model(np.zeros((2, s + 4, s + 4, 3), np.uint8))
  with pytest.raises(ValueError, match="wrong channel count"):
    model(np.zeros((2, s, s, 1), np.uint8))
  with pytest.raises(ValueError, match="model='int4'"):
    edge_predict.load(artefact[0], model="int4")


def test_layers_the_int8_student_keeps_float_are_float():
  """A student whose convs stay float (quantize_conv=False): the ViT patch
  embedding is a float Conv on a float kernel, the rest int8 as before."""
  name, ov = FAMILIES["vit"]
  s = ov["image_size"]
  spec = quant.int8(calibration="static").replace(quantize_conv=False)
  build = lambda q=None: students.build(name, embed_dim=16, quant=q, **ov)
  v = {"params": jax.jit(build().init)(jax.random.PRNGKey(2),
                                       jnp.zeros((1, s, s, 3)))["params"]}
  images = np.random.default_rng(2).uniform(size=(4, s, s, 3)).astype(
      np.float32)
  x = preprocess.normalize(jnp.asarray(images), "clip")
  cal = quant.calibrate(build(spec.replace(phase="calibrate")).apply, v, [x])
  fake_quant = []
  served = quant.convert(
      _jit_apply(build(spec.replace(phase="convert")), fake_quant), cal, x)
  served = jax.tree.map(np.asarray, flax.core.unfreeze(
      flax.linen.meta.unbox(served)))
  model = onnx_export.student_onnx(_meta("vit"), served, encoding="s8s8")
  conv = next(n for n in model.graph.node if n.op_type == "Conv")
  kernel = next(i for i in model.graph.initializer if i.name == conv.input[1])
  assert kernel.data_type == onnx.TensorProto.FLOAT
  producer = {o: n.op_type for n in model.graph.node for o in n.output}
  assert producer[conv.input[0]] != "DequantizeLinear"  # input not quantised
  assert _cos(_run(model, images), fake_quant[0]) >= 0.999
