"""CKA tooling: stage features, heat maps, evaluator, the 'cka' trainer and
the analysis notebook."""
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import transformers

from edgevl_jax.analysis import cka as cka_lib
from edgevl_jax.analysis import cka_evaluator
from edgevl_jax.analysis import features
from edgevl_jax.analysis import heatmap
from edgevl_jax.models import clip
from edgevl_jax.models import students

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_clip_folder(path):
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=8, eos_token_id=1,
                       bos_token_id=0, pad_token_id=1),
      vision_config=dict(hidden_size=16, intermediate_size=32,
                         num_hidden_layers=4, num_attention_heads=2,
                         image_size=16, patch_size=4),
      projection_dim=8)
  model = clip.CLIP(cfg)
  clip.save_pretrained(path, model, clip.init_params(model,
                                                     jax.random.key(0)))
  return path


def _tiny_student():
  model = students.build("resnet18", embed_dim=None, image_size=16,
                         stage_sizes=(1, 1, 1, 1), widths=(4, 8, 8, 8),
                         stem_width=4, cifar_stem=True)
  variables = jax.jit(model.init)(jax.random.key(1),
                                  jnp.zeros((1, 16, 16, 3)))
  return model, variables


def test_heatmap_png_and_json(tmp_path):
  m = np.array([[1.0, 0.2, np.nan], [0.3, 0.9, 0.5]])
  data = heatmap.write_json(str(tmp_path / "m.json"), m,
                            row_labels=["t0", "t1"],
                            col_labels=["s0", "s1", "s2"], modality="rgb")
  assert data["cka"][0][2] is None and data["cka"][1][1] == 0.9
  assert json.load(open(tmp_path / "m.json"))["modality"] == "rgb"
  png = heatmap.save_png(str(tmp_path / "m.png"), m, row_labels=["t0", "t1"],
                         col_labels=["s0", "s1", "s2"], title="x")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  fig = heatmap.plot(m, row_labels=["t0", "t1"], col_labels=["s0", "s1",
                                                              "s2"])
  texts = [t.get_text() for t in fig.axes[0].texts]
  assert texts == ["1.00", "0.20", "nan", "0.30", "0.90", "0.50"]
  with pytest.raises(ValueError, match="does not match"):
    heatmap.to_json(m, row_labels=["t0"], col_labels=["s0"])


def test_features_and_evaluator(tmp_path):
  t_model, t_params = clip.load_pretrained(
      _tiny_clip_folder(str(tmp_path / "clip")))
  s_model, s_vars = _tiny_student()
  images = jax.random.uniform(jax.random.key(2), (12, 16, 16, 3))
  t_fn = features.feature_fn(t_model, {"params": t_params}, kind="teacher")
  s_fn = features.feature_fn(s_model, s_vars, kind="student",
                             normalization="imagenet")
  t, s = t_fn(images), s_fn(images)
  # 4-block encoder: reference blocks 1, 3, 9, 11 of 12 -> 0, 1, 3.
  assert list(t) == ["block0", "block1", "block3"]
  assert t["block0"].shape == (12, 17 * 16)  # (1 + 16 tokens) * width
  assert list(s) == ["stage1", "stage2", "stage3", "stage4"]
  pooled = features.feature_fn(t_model, {"params": t_params}, kind="teacher",
                               pooled=True, blocks=[2])(images)
  assert pooled["block2"].shape == (12, 16)
  ev = cka_evaluator.CKAEvaluator(t_fn, images=images, pairs=[(0, 0), (2, 3)])
  out = ev.run(s_fn)
  assert set(out) == {"cka/t0_s0", "cka/t2_s3"}
  compiled = features.stage_fn(s_model, kind="student",
                               normalization="imagenet")
  assert ev.run(compiled, s_vars) == pytest.approx(out, rel=1e-6)
  want = float(cka_lib.cka(t["block3"], s["stage4"]))
  assert out["cka/t2_s3"] == pytest.approx(want, rel=1e-5)
  # Teacher vs itself: the diagonal of its own matrix is 1.
  own = ev.matrix(t_fn)
  np.testing.assert_allclose(np.diag(own), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="out of range"):
    features.feature_fn(t_model, {"params": t_params}, kind="teacher",
                        blocks=[7])(images)
  with pytest.raises(ValueError, match="modality must be"):
    features.modality_images({"rgb": images}, "swir", "depth")


@pytest.mark.slow
def test_cka_trainer_writes_heatmaps(tmp_path):
  import importlib.util
  from edgevl_jax import main as main_lib
  from edgevl_jax.run import registry
  spec = importlib.util.spec_from_file_location(
      "cka_config", os.path.join(REPO, "configs", "cka.py"))
  cfg_mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_mod)
  # A student saved the way the EdgeVL stages save theirs.
  from edgevl_jax.edgevl import handoff
  meta = {"name": "vit_ti16", "embed_dim": 8, "normalization": "clip",
          "image_size": 16, "overrides": dict(
              image_size=16, patch_size=4, width=16, depth=2, num_heads=2)}
  student = handoff.build_student(meta)
  params = flax.linen.unbox(jax.jit(student.init)(
      jax.random.key(3), jnp.zeros((1, 16, 16, 3))))["params"]
  os.makedirs(tmp_path / "student")
  handoff.save_student(str(tmp_path / "student"), meta=meta,
                         params=params)
  config = cfg_mod.get_config(
      f"quick,data_dir={tmp_path / 'tfds'},teacher={tmp_path / 'clip'},"
      f"student={tmp_path / 'student'}")
  _tiny_clip_folder(str(tmp_path / "clip"))
  work = str(tmp_path / "run")
  report = main_lib.run(config, work)
  for name in ("cka.json", "cka_rgb.png", "cka_depth.png", "report.json",
               "metrics.jsonl"):
    assert os.path.exists(os.path.join(work, name)), name
  data = json.load(open(os.path.join(work, "cka.json")))
  assert set(data) == {"rgb", "depth"}
  matrix = np.array(report["cka"]["rgb"]["matrix"], dtype=float)
  assert matrix.shape == (3, 4) and np.all((matrix > 0) & (matrix <= 1.0))
  assert report["num_examples"] == 32
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.num_minibatches = 16
  with pytest.raises(ValueError, match="num_minibatches"):
    registry.validate(bad)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  import nbformat
  from nbclient import NotebookClient
  path = os.path.join(REPO, "colabs", "cka_analysis.ipynb")
  nb = nbformat.read(path, as_version=4)
  # The kernel inherits this environment: outputs and data go to tmp_path.
  monkeypatch.setenv("CKA_NOTEBOOK_DIR", str(tmp_path))
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells
                    if c.cell_type == "code" for o in c.get("outputs", []))
  line = [l for l in outputs.splitlines() if l.startswith("CKA_SELF=")]
  assert line and float(line[0].split("=")[1]) == pytest.approx(1.0,
                                                                 abs=1e-4)
  assert os.path.exists(tmp_path / "cka_rgb_vs_depth.png")
