"""The demo pipeline on 2 processes x 2 CPU devices equals 1 process x 4.

Both runs go through the CLI exactly as `launch/slurm_gpu.sbatch` starts them
(`--coordinator_address`, `--num_processes`, `--process_id`; gloo collectives
on CPU), with the quick demo shrunk further by overrides so the three
processes stay affordable on a small machine.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from edgevl_jax.data import sources
from edgevl_jax.run import checkpoint as checkpoint_lib
from edgevl_jax.run import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Stage order of configs/demo.py: clip_pretrain, pseudo_labels,
# dual_modality_kd, qat_contrastive, evaluate, export.
SHRINK = (
    "--config.stages[0].num_steps=16", "--config.stages[0].batch_size=16",
    "--config.stages[0].log_every=8",
    "--config.stages[2].num_steps=8", "--config.stages[2].batch_size=16",
    "--config.stages[2].eval_every=8", "--config.stages[2].log_every=4",
    "--config.stages[3].num_steps=2", "--config.stages[3].batch_size=4",
    "--config.stages[3].eval_every=2", "--config.stages[3].log_every=2",
    "--config.stages[4].calibration_batch_size=8",
    "--config.stages[5].calibration_batch_size=8",
)
NUM_TEST = 240  # test split of the quick demo dataset


def _command(workdir, data_dir, *flags):
  return [sys.executable, "-m", "edgevl_jax.main",
          f"--config=configs/demo.py:quick,data_dir={data_dir}",
          f"--workdir={workdir}", *SHRINK, *flags]


def _env(devices):
  return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
          "JAX_DEFAULT_MATMUL_PRECISION": "highest",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _prepare_data(data_dir):
  """Builds the quick demo dataset once, so concurrent runs only read it."""
  spec = importlib.util.spec_from_file_location("demo_cfg",
                                                ROOT / "configs" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  sources.load_split("synthetic_rgbd", "test", data_dir=str(data_dir),
                     config=demo.QUICK_DATA)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  data_dir = tmp_path / "tfds"
  _prepare_data(data_dir)
  port = portpicker.pick_unused_port()
  # 1 process x 4 devices and 2 processes x 2 devices, run side by side.
  runs = [subprocess.Popen(
      _command(tmp_path / "one", data_dir), cwd=ROOT, env=_env(4),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
  runs += [subprocess.Popen(
      _command(tmp_path / "two", data_dir,
               f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=_env(2), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in runs:
    # Generous: wall time on a CPU shared with other jobs.
    _, err = p.communicate(timeout=2400)
    assert p.returncode == 0, err[-3000:]

  # The stage-1 student checkpoint written by 2 processes restores in this
  # one process (8 devices).
  kd_dir = "2_dual_modality_kd"
  p2 = checkpoint_lib.load_params(tmp_path / "two" / kd_dir)
  p1 = checkpoint_lib.load_params(tmp_path / "one" / kd_dir)
  assert jax.tree.structure(p1) == jax.tree.structure(p2)
  leaves = jax.tree.leaves(p2)
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  with open(tmp_path / "two" / "config.json") as f:
    assert json.load(f)["stages"][2]["num_steps"] == 8

  # Same global batches, so the same training up to reduction order.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), atol=2e-3), p1, p2)
  # Same examples, crops and texts per step: the logged training losses
  # agree to float noise (a different batch moves them by percents).
  for stage in ("0_clip_pretrain", "2_dual_modality_kd"):
    l1, l2 = [[r["loss"] for r in _read_jsonl(tmp_path / run / stage /
                                              "metrics.jsonl") if "loss" in r]
              for run in ("one", "two")]
    assert len(l1) == len(l2) >= 2
    np.testing.assert_allclose(l1, l2, rtol=1e-4)
  r1 = metrics_lib.read_report(tmp_path / "one")
  r2 = metrics_lib.read_report(tmp_path / "two")
  for model in ("teacher", "student_fp32", "student_int8_static",
                "student_int8_dynamic"):
    # Within one test example in float; the int8 students of this 8-step
    # run sit at near-tied logits, where fake-quant rounding turns the
    # 1e-7 float differences of the two reduction orders into a few flips.
    tol = (1 if "fp32" in model or model == "teacher" else 3) / NUM_TEST
    for modality in ("rgb", "depth"):
      a = r1["zero_shot"][model][modality]
      b = r2["zero_shot"][model][modality]
      assert 0.0 <= a <= 1.0
      assert abs(a - b) <= tol + 1e-9, (model, modality, a, b)
  assert r1["model_bytes"] == r2["model_bytes"]
  # Process 0 alone wrote the ONNX artefact and ran it on the test split.
  for run, report in (("one", r1), ("two", r2)):
    edge = report["edge"]
    # onnx_dir is relative to the pipeline folder (5_export/export_onnx).
    assert (tmp_path / run / edge["onnx_dir"] /
            "student_int8_u8.onnx").exists()
    assert edge["cosine_to_fake_quant"] >= 0.999
    for modality in ("rgb", "depth"):
      assert abs(edge["zero_shot_onnx_int8"][modality]
                 - edge["zero_shot_int8_static"][modality]) <= 0.005
