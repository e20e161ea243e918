"""predict CLI and artefact loading: bad flags, images and files are named.

A bad image is skipped with one warning naming it (the rest are predicted,
exit code 1 at the end); a bad flag or artefact file ends with exit code 2
and one `error:` line naming it, not a traceback.
"""
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from edgevl_jax import quant
from edgevl_jax.edgevl import handoff
from edgevl_jax.export import artifact
from edgevl_jax.export import predict

META = dict(name="vit_ti16", embed_dim=8, normalization="clip",
            overrides=dict(image_size=16, patch_size=8, width=16, depth=1,
                           num_heads=2))
CLASSES = ["chair", "table", "bed"]


@pytest.fixture(scope="module", name="exported")
def _exported(tmp_path_factory):
  model = handoff.build_student(META)
  params = model.init(jax.random.PRNGKey(0),
                      jnp.zeros((1, 16, 16, 3)))["params"]
  calib = [jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)),
                       jnp.float32)]
  spec = quant.int8(calibration="static")
  variables = quant.calibrate(
      handoff.build_student(META, spec.replace(phase="calibrate")).apply,
      {"params": params}, calib)
  served = quant.convert(
      handoff.build_student(META, spec.replace(phase="convert")).apply,
      variables, calib[0][:1])
  out = str(tmp_path_factory.mktemp("artifact"))
  artifact.export_artifact(
      out, meta=META, served=served, class_names=CLASSES,
      text_features=np.random.default_rng(1).normal(size=(3, 8)))
  return out


def _images(folder):
  rng = np.random.default_rng(4)
  os.makedirs(folder, exist_ok=True)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
        os.path.join(folder, f"img{i}.png"))
  return folder


def _run(capsys, *args):
  rc = predict.main(list(args))
  out, err = capsys.readouterr()
  return rc, out.strip().split("\n") if out.strip() else [], err


@pytest.mark.parametrize("batch", ["0", "-3"])
def test_non_positive_batch_size_is_refused(exported, tmp_path, capsys, batch):
  rc, out, err = _run(capsys, f"--artifact={exported}",
                      f"--images={_images(tmp_path)}", f"--batch_size={batch}")
  assert rc == 2 and out == []
  assert err == (f"error: --batch_size={batch} must be a positive integer "
                 "(images per forward pass, e.g. --batch_size=32).\n")


def test_bad_images_are_skipped_by_name_and_the_rest_predicted(
    exported, tmp_path, capsys):
  folder = _images(tmp_path / "imgs")
  os.makedirs(folder / "x.png")  # a folder named like an image
  (folder / "empty.jpg").write_bytes(b"")
  blob = (folder / "img0.png").read_bytes()
  (folder / "cut.png").write_bytes(blob[:len(blob) // 2])
  (folder / "page.png").write_text("<html>404</html>")
  (folder / "notes.txt").write_text("ignored: not named like an image")
  rc, out, err = _run(capsys, f"--artifact={exported}", f"--images={folder}",
                      "--batch_size=2")
  assert rc == 1
  assert [line.split("\t")[0] for line in out] == ["img0.png", "img1.png",
                                                   "img2.png"]
  lines = err.strip().split("\n")
  assert lines[0] == "warning: skipped x.png: is a folder, not an image file"
  assert lines[1].startswith("warning: skipped cut.png: is not a readable "
                             "image (truncated or not an image: OSError: "
                             "image file is truncated")
  assert lines[2] == "warning: skipped empty.jpg: is empty (0 bytes)"
  assert lines[3].startswith("warning: skipped page.png: is not a readable "
                             "image (truncated or not an image: "
                             "UnidentifiedImageError")
  assert lines[4] == ("error: 4 of 7 images were skipped (warnings above); "
                      "predicted the other 3.")
  assert len(lines) == 5
  # Without bad entries the exit code stays 0.
  rc, out, _ = _run(capsys, f"--artifact={exported}",
                    f"--images={_images(tmp_path / 'good')}")
  assert rc == 0 and len(out) == 3


def test_float_depth_with_nan_holes_is_predicted(exported, tmp_path, capsys):
  depth = np.random.default_rng(5).uniform(0.5, 4.0, (20, 20)).astype(
      np.float32)
  depth[:5] = np.nan
  folder = tmp_path / "depth"
  folder.mkdir()
  Image.fromarray(depth, mode="F").save(folder / "d.tiff")
  image = predict.read_image(str(folder / "d.tiff"), 16)
  assert image.shape == (16, 16, 3) and image.max() > 200  # not all zeros
  assert image[:3].max() == 0  # the holes
  rc, out, _ = _run(capsys, f"--artifact={exported}", f"--images={folder}")
  assert rc == 0 and out[0].startswith("d.tiff\t")


def _copy(exported, tmp_path):
  dst = str(tmp_path / "art")
  shutil.copytree(exported, dst)
  return dst


def _truncate(file):
  blob = open(file, "rb").read()
  open(file, "wb").write(blob[:len(blob) // 2])


@pytest.mark.parametrize("target,want", [
    (artifact.MANIFEST, "manifest.json is not valid JSON"),
    (artifact.WEIGHTS, "weights.msgpack: the weights (msgpack) file is "
     "truncated or corrupt"),
    (artifact.SYMBOLIC_FILE, "student.jax.bin: the program (jax.export) file "
     "is truncated or corrupt"),
    (artifact.TEXT_FEATURES, "text_features.npy: the text features (.npy) "
     "file is truncated or corrupt"),
])
def test_truncated_artefact_files_are_named(exported, tmp_path, capsys,
                                            target, want):
  art = _copy(exported, tmp_path)
  _truncate(os.path.join(art, target))
  with pytest.raises(ValueError) as e:
    artifact.load_artifact(art)
  assert want in str(e.value) and "re-export the artefact" in str(e.value)
  assert os.path.join(art, target) in str(e.value)
  rc, out, err = _run(capsys, f"--artifact={art}",
                      f"--images={_images(tmp_path / 'i')}")
  assert rc == 2 and out == []
  assert err.startswith("error: ") and want in err
  assert err.count("\n") == 1  # one line, no traceback


def test_missing_and_mismatched_artefact_files_are_named(exported, tmp_path):
  art = _copy(exported, tmp_path)
  os.remove(os.path.join(art, artifact.TEXT_FEATURES))
  with pytest.raises(ValueError, match=r"is missing \['text_features.npy'\]; "
                     "re-export it"):
    artifact.load_artifact(art)
  np.save(os.path.join(art, artifact.TEXT_FEATURES), np.ones((5, 8)))
  with pytest.raises(ValueError, match=r"text_features.npy has shape \(5, 8\),"
                     r" expected \(3, D\) for the 3 class_names"):
    artifact.load_artifact(art)
  np.save(os.path.join(art, artifact.TEXT_FEATURES), np.ones((3, 6)))
  with pytest.raises(ValueError, match=r"does not fit .*student.jax.bin: the "
                     r"program returns 8-dim embeddings but text_features.npy "
                     r"has 6 columns"):
    artifact.load_artifact(art)
  shutil.copy(os.path.join(exported, artifact.TEXT_FEATURES), art)
  weights_file = os.path.join(art, artifact.WEIGHTS)
  weights = flax.serialization.msgpack_restore(open(weights_file, "rb").read())
  flat = flax.traverse_util.flatten_dict(weights)
  key = max(flat, key=lambda k: np.asarray(flat[k]).size)
  flat[key] = np.asarray(flat[key])[..., :1]
  open(weights_file, "wb").write(flax.serialization.msgpack_serialize(
      flax.traverse_util.unflatten_dict(flat)))
  with pytest.raises(ValueError, match=r"weights.msgpack does not fit "
                     r".*student.jax.bin: array \d+ is int8\[.*\], the program "
                     r"expects int8\[.*\]; the files come from different "
                     "exports"):
    artifact.load_artifact(art)
  with open(os.path.join(art, artifact.MANIFEST), "w") as f:
    f.write('{"format": "%s"}' % artifact.FORMAT)
  with pytest.raises(ValueError, match=r"manifest.json has no \['programs', "
                     r"'class_names', 'image_size', 'logit_scale'\]"):
    artifact.load_artifact(art)
