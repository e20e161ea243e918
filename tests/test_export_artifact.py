"""The jax.export edge artefact against the in-framework int8 served student."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from edgevl_jax import quant
from edgevl_jax.edgevl import handoff
from edgevl_jax.export import artifact
from edgevl_jax.export import predict
from edgevl_jax.models import preprocess

META = dict(name="vit_ti16", embed_dim=16, normalization="clip",
            overrides=dict(image_size=16, patch_size=4, width=32, depth=1,
                           num_heads=2))
CLASSES = ["chair", "table", "bed", "sofa", "lamp"]


def _served(seed=0):
  """Static-calibrated, converted tiny student (fp32 params random)."""
  model = handoff.build_student(META)
  params = model.init(jax.random.PRNGKey(seed),
                      jnp.zeros((1, 16, 16, 3)))["params"]
  rng = np.random.default_rng(seed)
  calib = [jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)]
  spec = quant.int8(calibration="static")
  variables = quant.calibrate(
      handoff.build_student(META, spec.replace(phase="calibrate")).apply,
      {"params": params}, calib)
  return quant.convert(
      handoff.build_student(META, spec.replace(phase="convert")).apply,
      variables, calib[0][:1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  served = _served()
  text = np.random.default_rng(1).normal(size=(len(CLASSES), 16))
  out = str(tmp_path_factory.mktemp("artifact"))
  manifest = artifact.export_artifact(
      out, meta=META, served=served, text_features=text, class_names=CLASSES,
      teacher_bytes=4_000_000)
  return out, served, manifest


def _reference(served, images01):
  """In-framework served int8 student, normalised output."""
  model = handoff.build_student(
      META, quant.int8(calibration="static").replace(phase="serve"))
  x = preprocess.normalize(jnp.asarray(images01, jnp.float32), "clip")
  emb = jax.jit(lambda v, x: quant.serve_apply(model.apply, v, x))(served, x)
  return np.asarray(emb / jnp.linalg.norm(emb, axis=-1, keepdims=True))


def test_artifact_matches_served_int8_model(exported):
  out, served, manifest = exported
  art = artifact.load_artifact(out)
  images = np.random.default_rng(2).integers(0, 256, (5, 16, 16, 3),
                                             dtype=np.uint8)
  emb, classes = art(images)
  ref = _reference(served, images.astype(np.float32) / 255.0)
  np.testing.assert_allclose(emb, ref, atol=2e-5, rtol=0)
  np.testing.assert_array_equal(classes,
                                np.argmax(ref @ art.text_features.T, -1))
  # float input in [0, 1] gives the same embedding as uint8.
  np.testing.assert_allclose(art.embed(images.astype(np.float32) / 255.0),
                             emb, atol=1e-6)
  assert manifest["batch_sizes"] == "symbolic"
  assert manifest["weights"]["passed_as"] == "input"


def test_weights_stay_int8_on_disk(exported):
  out, served, manifest = exported
  n_int = sum(np.asarray(a).size for a in jax.tree.leaves(served["aqt"])
              if np.asarray(a).dtype == np.int8)
  assert n_int > 10_000
  assert "int8" in manifest["weights"]["dtypes"]
  # The weights file is about 1 byte per int8 weight, not 4.
  assert manifest["bytes"]["weights_file"] < 2 * n_int
  assert os.path.getsize(os.path.join(out, artifact.WEIGHTS)) == (
      manifest["bytes"]["weights_file"])
  # The program carries no copy of the weights (they are inputs).
  kernel = max((np.asarray(a) for a in jax.tree.leaves(served["aqt"])
                if np.asarray(a).dtype == np.int8), key=np.size)
  with open(os.path.join(out, manifest["programs"]["symbolic"]), "rb") as f:
    program = f.read()
  assert kernel.tobytes()[:64] not in program
  assert kernel.tobytes()[:64] in open(
      os.path.join(out, artifact.WEIGHTS), "rb").read()
  assert manifest["bytes"]["compression_int8"] > 100


def test_text_features_unit_norm_and_manifest(exported):
  out, _, manifest = exported
  text = np.load(os.path.join(out, artifact.TEXT_FEATURES))
  assert text.shape == (len(CLASSES), 16)
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, atol=1e-6)
  with open(os.path.join(out, artifact.MANIFEST)) as f:
    on_disk = json.load(f)
  assert on_disk["class_names"] == CLASSES
  assert on_disk["image_size"] == 16
  assert on_disk["input"]["mean"] == pytest.approx(list(preprocess.CLIP_MEAN))


def test_fixed_batch_sizes_pad_and_match(exported, tmp_path):
  out, served, _ = exported
  text = np.load(os.path.join(out, artifact.TEXT_FEATURES))
  manifest = artifact.export_artifact(
      str(tmp_path), meta=META, served=served, text_features=text,
      class_names=CLASSES, batch_sizes=(2,))
  assert manifest["batch_sizes"] == [2]
  images = np.random.default_rng(3).random((3, 16, 16, 3), np.float32)
  emb, _ = artifact.load_artifact(str(tmp_path))(images)
  np.testing.assert_allclose(emb, artifact.load_artifact(out).embed(images),
                             atol=2e-5)


def test_predict_cli_prints_a_line_per_image(exported, tmp_path, capsys):
  out, _, _ = exported
  rng = np.random.default_rng(4)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(
        tmp_path / f"img{i}.png")
  Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(
      tmp_path / "depth.png")
  (tmp_path / "notes.txt").write_text("not an image")
  assert predict.main([f"--artifact={out}", f"--images={tmp_path}"]) == 0
  lines = capsys.readouterr().out.strip().split("\n")
  assert [l.split("\t")[0] for l in lines] == [
      "depth.png", "img0.png", "img1.png", "img2.png"]
  for line in lines:
    _, cls, conf = line.split("\t")
    assert cls in CLASSES
    assert 0.0 < float(conf) <= 1.0


def test_bad_artifact_folder_is_named(tmp_path, exported, capsys):
  with pytest.raises(ValueError, match="no manifest.json"):
    artifact.load_artifact(str(tmp_path))
  assert predict.main([f"--artifact={tmp_path}",
                       f"--images={tmp_path}"]) == 2
  assert "is not an edgevl_jax artefact" in capsys.readouterr().err
  out, _, _ = exported
  with pytest.raises(ValueError, match=r"images must be \(B, 16, 16, 3\)"):
    artifact.load_artifact(out)(np.zeros((1, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="len\\(class_names\\) = 2"):
    artifact.export_artifact(str(tmp_path), meta=META, served={},
                             text_features=np.ones((3, 16)),
                             class_names=["a", "b"])
