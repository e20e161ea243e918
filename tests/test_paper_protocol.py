"""The paper configs follow the published EdgeVL / CDFKD-MFS protocol.

Band, class split and the ScanNet resize have their own tests
(test_data_eurosat.py, test_data_local.py); float calibration and Swin's
float patch embedding are in test_quant.py / test_students.py. Here: steps
per stage from each stage's own curated subset, per-stage kept fractions
and margins, the published vocabularies as default, the student_hf rule,
the CDFKD stems, and the runlocal paper pipelines end to end.
"""
import json
import os
import runpy

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from edgevl_jax import main as main_lib
from edgevl_jax.data import info as info_lib
from edgevl_jax.edgevl import clip_teacher
from edgevl_jax.edgevl import curation
from edgevl_jax.edgevl import handoff
from edgevl_jax.jobs import pseudo_labels
from edgevl_jax.models import clip
from edgevl_jax.models import multihead
from edgevl_jax.presets import classification as cls_presets
from edgevl_jax.presets import edgevl as presets
from edgevl_jax.run import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EDGEVL = runpy.run_path(os.path.join(ROOT, "configs", "edgevl.py"))
_DATAFREE = runpy.run_path(os.path.join(ROOT, "configs", "datafree_kd.py"))


def _stages(arg):
  return {s.name: s for s in _EDGEVL["get_config"](arg).stages}


@pytest.mark.parametrize("dataset,student,kept,margin", [
    ("scannet", "swin_t_edgevl", (0.20, 0.25), 0.3),
    ("scannet", "swin_t", (0.20, 0.25), 0.3),
    ("eurosat", "swin_t_edgevl", (0.10, 0.50), 0.3),
    ("eurosat", "vit_s16", (0.25, 0.25), 0.3),
    ("scannet", "vit_b16", (0.25, 0.25), 0.3),
    ("sun_rgbd", "swin_t_edgevl", (1.0, 0.98), 0.15),
    ("sun_rgbd", "vit_s16", (1.0, 0.98), 0.15),
])
def test_reference_kept_fractions_margins_and_epochs(dataset, student, kept,
                                                     margin):
  s = _stages(f"dataset={dataset},student={student},student_hf=none")
  assert (s["dual_modality_kd"].kept_fraction,
          s["qat_contrastive"].kept_fraction) == kept
  assert s["pseudo_labels"].kept_fraction == kept[0]
  assert s["qat_contrastive"].margin == margin
  # 120 epochs per stage; steps are derived by each stage, not shared.
  assert s["dual_modality_kd"].epochs == s["qat_contrastive"].epochs == 120
  assert (s["dual_modality_kd"].batch_size,
          s["qat_contrastive"].batch_size) == (32, 4)
  assert s["pseudo_labels"].vocabulary == "published"
  assert s["evaluate"].calibration_mode == "float"
  # runlocal cuts epochs (one per stage), not the epoch -> step relation.
  s = _stages(f"dataset={dataset},student={student},runlocal")
  assert s["dual_modality_kd"].epochs == s["qat_contrastive"].epochs == 1
  assert s["dual_modality_kd"].student.hf_path == ""


def test_paper_config_requires_student_hf_and_says_where_it_comes_from():
  with pytest.raises(ValueError, match=r"student_hf is not set.*ImageNet "
                     r"weights.*save_pretrained.*student_hf=none"):
    _EDGEVL["get_config"]("dataset=scannet")
  s = _stages("dataset=scannet,student_hf=/models/swin_t_in1k")
  assert s["dual_modality_kd"].student.hf_path == "/models/swin_t_in1k"
  assert _stages("dataset=scannet,student_hf=none")[
      "dual_modality_kd"].student.hf_path == ""


def _config(**values):
  return ml_collections.ConfigDict(dict(
      dict(batch_size=4, num_steps=1000, epochs=0.0, kept_fraction=0.0,
           pseudo_labels="x"), **values))


def test_stage_steps_follow_each_stages_own_subset_and_batch():
  # Stage 1: 300 kept pairs at batch 32 -> 9 steps/epoch; stage 2: 375
  # kept anchors at batch 4 -> 93 steps/epoch; both 120 epochs.
  s1 = curation.stage_schedule(_config(batch_size=32, epochs=120.0), 300)
  s2 = curation.stage_schedule(_config(batch_size=4, epochs=120.0), 375)
  assert (s1["steps_per_epoch"], s1["num_steps"]) == (9, 1080)
  assert (s2["steps_per_epoch"], s2["num_steps"]) == (93, 11160)
  assert s1["epochs"] == s2["epochs"] == 120
  # Without epochs, num_steps rules and the epochs it amounts to are shown.
  s = curation.stage_schedule(_config(batch_size=4, num_steps=50), 40)
  assert (s["num_steps"], s["epochs"]) == (50, 5.0)
  # Fractional epochs round up to a whole step.
  assert curation.stage_schedule(_config(epochs=0.5), 10)["num_steps"] == 1


def test_each_stage_keeps_its_own_most_confident_fraction(tmp_path):
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(6), size=200).astype(np.float32)
  kept, labels, conf = curation.curate(probs, 0.2)
  curation.save(str(tmp_path), kept=kept, labels=labels, confidences=conf,
                vocabulary=np.asarray(list("abcdef")))
  own, own_labels = curation.curated_subset(str(tmp_path))
  np.testing.assert_array_equal(own, kept)
  assert len(own) == 40
  wider, wider_labels = curation.curated_subset(str(tmp_path), 0.25)
  assert len(wider) == 50
  # The most confident 25%, most confident first, with their own labels.
  np.testing.assert_array_equal(wider, np.argsort(-conf, kind="stable")[:50])
  np.testing.assert_array_equal(wider_labels, probs.argmax(-1)[wider])
  assert set(own) <= set(wider)
  everything, _ = curation.curated_subset(str(tmp_path), 1.0)
  assert len(everything) == 200  # SUN RGB-D stage 1: no curation
  with pytest.raises(ValueError, match="needs config.pseudo_labels"):
    curation.validate_stage(_config(kept_fraction=0.5, pseudo_labels=""))
  with pytest.raises(ValueError, match=r"config.kept_fraction.*\[0, 1\]"):
    curation.validate_stage(_config(kept_fraction=1.5))


def test_default_vocabulary_is_the_published_list_not_the_test_classes():
  config = registry.job_config("pseudo_labels")
  assert config.vocabulary == "published"
  eurosat = info_lib.get_info("eurosat")
  assert eurosat.superset_vocabulary == info_lib.PUBLISHED_SATELLITE_LINES
  assert len(eurosat.superset_vocabulary) == 15
  lower = {n.lower() for n in eurosat.superset_vocabulary}
  assert not lower & {"sea lake", "residential", "highway"}
  indoor = info_lib.get_info("scannet").superset_vocabulary
  # 51 published lines, "Classroom" and "Laboratory" twice: 49 names.
  assert len(info_lib.PUBLISHED_INDOOR_LINES) == 51 and len(indoor) == 49
  config.vocabulary = "test_classes"
  with pytest.raises(ValueError, match="config.vocabulary must be one of"):
    pseudo_labels.validate(config)


@pytest.mark.parametrize("preset,cifar_stem,w_feat", [
    ("cifar100", True, 0.2), ("caltech101", False, 0.2),
    ("mini_imagenet", False, 0.05)])
def test_cdfkd_presets_build_the_papers_stem(preset, cifar_stem, w_feat):
  config = _DATAFREE["get_config"](preset)
  assert config.loss.w_feat == w_feat
  size = config.generator.image_size
  student = multihead.build(config.student.trunk, num_heads=3,
                            num_classes=10,
                            **config.student.overrides.to_dict())
  shapes = nn.unbox(jax.eval_shape(student.init, jax.random.key(0),
                                   np.zeros((1, size, size, 3), np.float32)))
  stem = shapes["params"]["trunk"]["stem_conv"]["kernel"]
  assert stem.shape[:2] == ((3, 3) if cifar_stem else (7, 7))
  assert cls_presets.DATAFREE_PAPER[preset]["cifar_stem"] == cifar_stem


# ---------------------------------------------------------------- end to end


def _tiny_teacher(path, info_names, image_size=32):
  """A tiny random CLIP in HF format + a BPE tokenizer on the prompts."""
  corpus = [t.format(n) for n in info_names
            for t in ("a photo of a {}", "a satellite image of a {}")]
  clip.train_tokenizer(corpus, path, vocab_size=300, model_max_length=16)
  tokenizer = clip.load_tokenizer(path)
  m = ml_collections.ConfigDict(dict(
      vision_width=32, vision_layers=1, vision_heads=2, patch_size=8,
      text_width=32, text_layers=1, text_heads=2, projection_dim=16,
      max_length=16, hidden_act="gelu"))
  model = clip.CLIP(config=clip_teacher.build_hf_config(
      m, image_size=image_size, vocab_size=max(len(tokenizer), 300)))
  clip.save_pretrained(path, model, clip.init_params(model,
                                                     jax.random.key(0)))
  return str(path)


def _report(workdir):
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


def _check_pipeline_report(report, *, kept, batches):
  stages = report["stages"] if "stages" in report else report
  kd = stages["dual_modality_kd"]["kd"]
  qat = stages["qat_contrastive"]["qat"]
  # Each stage ran one epoch over its own subset at its own batch.
  assert kd["epochs"] == qat["epochs"] == 1.0
  assert kd["kept_examples"] == kd["examples"]
  assert kd["num_steps"] == max(1, kd["examples"] // batches[0])
  assert qat["num_steps"] == max(1, qat["examples"] // batches[1])
  assert qat["examples"] / kd["examples"] == pytest.approx(
      kept[1] / kept[0], rel=0.2)
  return kd, qat


def test_runlocal_eurosat_paper_pipeline_end_to_end(tmp_path):
  """configs/edgevl.py:dataset=eurosat,runlocal on mocked eurosat/all, with
  a BatchNorm student (ResNet-18): its running statistics are trained in
  stage 1, updated in stage 2 and used by evaluation and export."""
  teacher = _tiny_teacher(
      tmp_path / "teacher", info_lib.SATELLITE_SUPERSET
      + info_lib.EUROSAT_CLASSES)
  config = _EDGEVL["get_config"](
      f"dataset=eurosat,student=resnet18,runlocal,mining=online,"
      f"teacher={teacher},"
      f"data_dir={tmp_path / 'tfds'}")
  # The test process has 8 CPU devices; runlocal's stage-2 batch is 2.
  [qat_stage] = [s for s in config.stages if s.name == "qat_contrastive"]
  qat_stage.batch_size = 8
  workdir = str(tmp_path / "wd")
  with tfds.testing.mock_data(num_examples=240):
    main_lib.run(config, workdir)
  report = _report(workdir)
  kd, qat = _check_pipeline_report(report, kept=(0.10, 0.50),
                                   batches=(8, 8))
  stages = report.get("stages", report)
  pseudo = stages["pseudo_labels"]["pseudo_labels"]
  assert pseudo["kept_fraction"] == 0.10
  # BatchNorm statistics: learnt in stage 1, moved on in stage 2, and the
  # ones the evaluation and the export use.
  stats = {}
  for stage in ("1_dual_modality_kd", "2_qat_contrastive"):
    _, variables, meta = handoff.student_variables(
        os.path.join(workdir, stage))
    assert meta["model_state"] == ["batch_stats"]
    stats[stage] = variables["batch_stats"]
  means = [np.asarray(l) for l in jax.tree.leaves(stats["1_dual_modality_kd"])]
  assert means and all(np.isfinite(m).all() for m in means)
  assert any(np.abs(m).max() > 1e-3 for m in means)  # not the init (0/1)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       stats["1_dual_modality_kd"], stats["2_qat_contrastive"])
  assert max(jax.tree.leaves(moved)) > 0
  zs = report["zero_shot"]
  for model in ("student_fp32", "student_int8_static"):
    assert 0.0 <= zs[model]["swir"] <= 1.0
  # Labelled against the 15 published land-cover names.
  with np.load(os.path.join(workdir, "0_pseudo_labels",
                            curation.OUTPUT_FILE)) as f:
    assert len(f["vocabulary"]) == 15
  print("eurosat runlocal:", json.dumps({"kd": kd, "qat": qat}))


def _scannet_folder(root, train_scenes=22, valid_scenes=2):
  """ScanNet's layout at sensor resolution: 1296 x 968 colour JPEGs,
  640 x 480 uint16 depth, two frames per scene, random scene types."""
  rng = np.random.default_rng(0)
  names = info_lib.SCANNET_CLASSES
  yy, xx = np.mgrid[0:968, 0:1296]
  for split, scenes in (("train", range(train_scenes)),
                        ("valid", range(700, 700 + valid_scenes))):
    ids = [f"scene{s:04d}_00/{f:05d}" for s in scenes for f in (0, 100)]
    with open(os.path.join(_mkdir(root), f"{split}_every_100th.txt"),
              "w") as f:
      f.write("\n".join(ids))
    for k, i in enumerate(ids):
      scene = i.split("/")[0]
      rgb = np.stack([(xx * 255 // 1296 + 13 * k) % 256, yy * 255 // 968,
                      (xx // 7 + yy // 5 + 40 * k) % 256], -1)
      Image.fromarray(rgb.astype(np.uint8)).save(
          os.path.join(_mkdir(root, split, "rgb", scene), i[-5:] + ".jpg"),
          quality=85)
      Image.fromarray(rng.integers(400, 5000, (480, 640)).astype(
          np.uint16)).save(os.path.join(_mkdir(root, split, "depth", scene),
                                        i[-5:] + ".png"))
      with open(os.path.join(_mkdir(root, split, "scene_class"),
                             scene + ".txt"), "w") as f:
        f.write(names[int(scene[5:9]) % len(names)])
  return root


def _mkdir(*parts):
  path = os.path.join(*map(str, parts))
  os.makedirs(path, exist_ok=True)
  return path


@pytest.mark.slow
def test_runlocal_scannet_at_sensor_resolution_end_to_end(tmp_path):
  """configs/edgevl.py:dataset=scannet,runlocal (the default EdgeVL Swin)
  on a folder at ScanNet's real resolutions, through export."""
  root = _scannet_folder(str(tmp_path / "scannet"))
  teacher = _tiny_teacher(tmp_path / "teacher", info_lib.INDOOR_SUPERSET
                          + info_lib.SCANNET_CLASSES)
  config = _EDGEVL["get_config"](
      f"dataset=scannet,runlocal,mining=online,teacher={teacher},"
      f"data_dir={tmp_path / 'tfds'},source_dir={root}")
  [qat_stage] = [s for s in config.stages if s.name == "qat_contrastive"]
  qat_stage.batch_size = 8  # 8 CPU devices in the test process
  workdir = str(tmp_path / "wd")
  main_lib.run(config, workdir)
  report = _report(workdir)
  kd, qat = _check_pipeline_report(report, kept=(0.20, 0.25),
                                   batches=(8, 8))
  assert report["zero_shot"]["student_int8_static"]["depth"] >= 0.0
  with np.load(os.path.join(workdir, "0_pseudo_labels",
                            curation.OUTPUT_FILE)) as f:
    assert len(f["vocabulary"]) == 49  # the published indoor names
  print("scannet runlocal:", json.dumps({"kd": kd, "qat": qat}))


@pytest.mark.slow
def test_runlocal_ghostnet_folds_before_quantisation_end_to_end(tmp_path):
  """GhostNetV3 through every stage: trained with its re-parameterisable
  branches and BatchNorm in stage 1, folded (deploy=True) before QAT, then
  calibrated, evaluated and exported folded (64 px EuroSAT tiles)."""
  teacher = _tiny_teacher(tmp_path / "teacher", info_lib.SATELLITE_SUPERSET
                          + info_lib.EUROSAT_CLASSES, image_size=64)
  config = _EDGEVL["get_config"](
      f"dataset=eurosat,student=ghostnetv3_100,runlocal,mining=online,"
      f"teacher={teacher},data_dir={tmp_path / 'tfds'}")
  assert config.image_size == 64
  [qat_stage] = [s for s in config.stages if s.name == "qat_contrastive"]
  qat_stage.batch_size = 8
  workdir = str(tmp_path / "wd")
  with tfds.testing.mock_data(num_examples=240):
    main_lib.run(config, workdir)
  report = _report(workdir)
  _check_pipeline_report(report, kept=(0.10, 0.50), batches=(8, 8))
  _, v1, meta1 = handoff.student_variables(
      os.path.join(workdir, "1_dual_modality_kd"))
  _, v2, meta2 = handoff.student_variables(
      os.path.join(workdir, "2_qat_contrastive"))
  assert not meta1["overrides"].get("deploy")
  assert meta2["overrides"]["deploy"] is True
  n = lambda v: sum(np.size(x) for x in jax.tree.leaves(v["params"]))
  assert n(v2) < n(v1)  # the train-time branches were folded
  assert meta2["model_state"] == ["batch_stats"]
  assert 0.0 <= report["zero_shot"]["student_int8_static"]["swir"] <= 1.0
