"""The demo pipeline end to end (quick variant): report keys and the effect."""
import importlib.util
import json
import os

import pytest

from edgevl_jax import main as main_lib

MODELS = ("teacher", "student_fp32", "student_int8_static",
          "student_int8_dynamic")
STAGES = ("clip_pretrain", "pseudo_labels", "dual_modality_kd",
          "qat_contrastive", "evaluate", "export")


def _demo_config(arg):
  spec = importlib.util.spec_from_file_location("demo_cfg", "configs/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("demo")
  config = _demo_config(f"quick,data_dir={tmp / 'tfds'}")
  workdir = str(tmp / "demo")
  main_lib.run(config, workdir)
  with open(os.path.join(workdir, "report.json")) as f:
    # Paths in report.json are relative to its folder.
    return {**json.load(f), "_workdir": workdir}


@pytest.mark.slow
def test_demo_quick_report_and_artefacts(quick_report):
  report = quick_report
  zs = report["zero_shot"]
  for model in MODELS:
    for modality in ("rgb", "depth"):
      assert 0.0 <= zs[model][modality] <= 1.0
  for key in ("teacher_fp32", "student_fp32", "student_int8"):
    assert report["model_bytes"][key] > 0
  assert report["model_bytes"]["student_int8"] < report["model_bytes"][
      "student_fp32"]
  assert set(STAGES) <= set(report["seconds"])
  for name in ("weights.msgpack", "text_features.npy", "manifest.json"):
    assert os.path.exists(os.path.join(report["_workdir"],
                                       report["export_dir"], name))
  # The ONNX edge artefact, run by ONNX Runtime on the test split.
  edge = report["edge"]
  for name in ("student_fp32.onnx", "student_int8_u8.onnx",
               "student_int8_s8s8.onnx", "text_features.npy",
               "manifest.json"):
    assert os.path.exists(os.path.join(report["_workdir"], edge["onnx_dir"],
                                       name))
  assert 0 < edge["onnx_int8_bytes"] < edge["onnx_fp32_bytes"]
  assert edge["onnx_int8_bytes"] <= 1.10 * edge["served_int8_bytes"]
  assert edge["cosine_to_fake_quant"] >= 0.999
  for modality in ("rgb", "depth"):
    # ONNX int8 within 0.5 points of the in-framework static int8.
    assert abs(edge["zero_shot_onnx_int8"][modality]
               - edge["zero_shot_int8_static"][modality]) <= 0.005
    assert abs(edge["zero_shot_int8_static"][modality]
               - report["zero_shot"]["student_int8_static"][modality]) <= 0.005


@pytest.mark.slow
def test_demo_quick_effect(quick_report):
  # EdgeVL's effect on the quick budget (960 train scenes): the RGB-only
  # teacher is much worse on depth than on RGB, the student beats it on
  # depth by a wide margin, and static int8 stays close to fp32.
  zs = quick_report["zero_shot"]
  teacher, fp32 = zs["teacher"], zs["student_fp32"]
  assert teacher["rgb"] > teacher["depth"] + 0.15, teacher
  assert fp32["depth"] > teacher["depth"] + 0.15, (fp32, teacher)
  for modality in ("rgb", "depth"):
    assert abs(zs["student_int8_static"][modality] - fp32[modality]) <= 0.03
