"""Every real trainer, killed mid-run and re-run, ends bit-identical.

Each test runs a real config (tiny step counts through --config overrides)
once uninterrupted, then again in a fresh workdir through a chain of real
kills (tests/fault_injection.py), re-running the same command after each:
SIGTERM mid-stage (the run's own preemption checkpoint), SIGKILL mid-stage,
SIGKILL while a checkpoint is being written, and for one-shot stages SIGKILL
just before their report. The finished chain must equal the uninterrupted
run: every saved parameter, every logged loss and metric, report.json.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from edgevl_jax.run import checkpoint as checkpoint_lib  # noqa: E402
from edgevl_jax.run import metrics as metrics_lib  # noqa: E402

# Values that are not results: wall-clock measurements, and whether a
# pipeline stage was skipped because an earlier run finished it.
TIMING_KEYS = ('seconds', 'steps_per_sec', 'skipped')


def _run(config, workdir, overrides, fault='', cache=None):
  env = {**os.environ, 'PYTHONPATH': str(ROOT),
         'JAX_DEFAULT_MATMUL_PRECISION': 'highest',
         'EDGEVL_FAULT': fault}
  if cache:
    env['JAX_COMPILATION_CACHE_DIR'] = str(cache)
  return subprocess.run(
      [sys.executable, 'tests/fault_injection.py', f'--config={config}',
       f'--workdir={workdir}', *overrides], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=900)


def _expect(run, fault):
  kind = fault.split('@')[0]
  tail = run.stderr[-3000:]
  if kind == 'sigterm':
    assert run.returncode == 1 and 'Preempted (SIGTERM)' in run.stderr, tail
  elif kind.startswith('sigkill'):
    assert run.returncode == -signal.SIGKILL, tail
  else:
    assert run.returncode == 0, tail


def _strip_timing(tree):
  if isinstance(tree, dict):
    return {k: _strip_timing(v) for k, v in tree.items()
            if k not in TIMING_KEYS}
  if isinstance(tree, list):
    return [_strip_timing(v) for v in tree]
  return tree


def _curves(path):
  """{(step, key): value} of every logged number but timings."""
  out = {}
  for record in metrics_lib.read_jsonl(path):
    for key, value in record.items():
      if key != 'step' and key not in TIMING_KEYS:
        out[(record['step'], key)] = value
  return out


def _params(folder):
  """Every saved parameter of a run folder, as {name: numpy array}."""
  out = {}
  ckpt = folder / 'checkpoints'
  if ckpt.exists():
    with checkpoint_lib.Checkpointer(ckpt) as c:
      final = c.latest_step()
      collections = sorted(c.item_metadata(final))
    for collection in collections:  # the whole saved state
      tree = checkpoint_lib.load_params(folder, step=final,
                                        collection=collection)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[f'ckpt/{collection}{jax.tree_util.keystr(path)}'] = (
            np.asarray(leaf))
  student = folder / 'student_params.msgpack'
  if student.exists():
    tree = flax.serialization.msgpack_restore(student.read_bytes())
    out.update({f'student/{k}': np.asarray(v) for k, v in
                flax.traverse_util.flatten_dict(tree, sep='/').items()})
  return out


def assert_same_run(reference, resumed):
  """Every folder holding results: same params, curves and report."""
  folders = [p.parent for p in reference.rglob('report.json')]
  assert folders
  for ref in folders:
    got = resumed / ref.relative_to(reference)
    name = str(ref.relative_to(reference)) or '.'
    want_report = json.loads((ref / 'report.json').read_text())
    got_report = json.loads((got / 'report.json').read_text())
    assert _strip_timing(got_report) == _strip_timing(want_report), name
    if (ref / 'metrics.jsonl').exists():
      assert _curves(got / 'metrics.jsonl') == _curves(
          ref / 'metrics.jsonl'), name
    want, have = _params(ref), _params(got)
    assert sorted(have) == sorted(want), name
    for key, value in want.items():
      assert np.array_equal(have[key], value), (name, key)


def assert_runner_outputs(workdir):
  """Every training run (a folder with checkpoints/) has the runner's
  outputs, whatever the job: metrics.jsonl logged at the same cadence keys,
  TensorBoard events, loss.png; and its job folder has report.json."""
  runs = [p.parent for p in workdir.rglob('checkpoints')
          if p.is_dir() and '.corrupt' not in str(p)]
  assert runs
  for run in runs:
    records = metrics_lib.read_jsonl(run / 'metrics.jsonl')
    train = [r for r in records if any('loss' in k for k in r)]
    assert train and all({'step', 'steps_per_sec'} <= set(r) for r in train)
    assert any(f.name.startswith('events.out.tfevents')
               for f in (run / 'tb').iterdir()), run
    assert (run / 'loss.png').stat().st_size > 0, run
    job = run if (run / 'report.json').exists() else run.parent
    assert (job / 'report.json').exists(), run


def run_chain(tmp_path, config, overrides, faults, move_after=None):
  """Uninterrupted run + the fault chain; asserts they are identical.

  With `move_after=k`, the chain's workdir is moved to a new path after the
  k-th fault (the old path no longer exists): a moved workdir must resume
  without reading anything at its old location.
  """
  cache = tmp_path / 'jax_cache'
  reference = tmp_path / 'reference'
  run = _run(config, reference, overrides, cache=cache)
  assert run.returncode == 0, run.stderr[-3000:]
  assert_runner_outputs(reference)
  chain = tmp_path / 'chain'
  for i, fault in enumerate(faults + ['']):
    run = _run(config, chain, overrides, fault, cache=cache)
    _expect(run, fault)
    if i == move_after:
      chain.rename(tmp_path / 'chain_moved')
      chain = tmp_path / 'chain_moved'
    if fault.startswith('sigkill-ckpt'):
      # Killed inside the write: the half-written folder is orbax's
      # temporary one, which a resume ignores.
      where = fault.split('@')[1].split(':')[0]
      folders = [p for p in chain.rglob('*orbax-checkpoint-tmp*')
                 if where in str(p)]
      assert folders, f'{fault}: no half-written checkpoint found'
  assert_same_run(reference, chain)
  return reference, chain


def _training_faults(where):
  """SIGTERM at 3, SIGKILL at 6, SIGKILL inside the next checkpoint write."""
  return [f'sigterm@{where}:3', f'sigkill@{where}:6',
          f'sigkill-ckpt@{where}:1']


def _cadence(index, steps=12):
  return [f'--config.stages[{index}].num_steps={steps}',
          f'--config.stages[{index}].log_every=2',
          f'--config.stages[{index}].ckpt_every=4']


@pytest.mark.slow
def test_demo_pipeline_killed_in_every_stage_resumes_identically(tmp_path):
  """clip_pretrain, dual_modality_kd and qat_contrastive each meet all three
  kills; pseudo_labels, evaluate and export die before their report."""
  overrides = ['--config.data_config=custom_32px_256_64_64',
               *_cadence(0), *_cadence(2), '--config.stages[2].eval_every=6',
               *_cadence(3), '--config.stages[3].eval_every=6']
  faults = (_training_faults('0_clip_pretrain')
            + ['sigkill-report@1_pseudo_labels']
            + _training_faults('2_dual_modality_kd')
            + _training_faults('3_qat_contrastive')
            + ['sigkill-report@4_evaluate', 'sigkill-report@5_export'])
  config = f'configs/demo.py:quick,data_dir={tmp_path / "tfds"}'
  # Moved after stage 1: stages 2-5 read the teacher and pseudo-labels of
  # stages 0-1 from the new location only.
  reference, chain = run_chain(tmp_path, config, overrides, faults,
                               move_after=3)
  report = json.loads((chain / 'report.json').read_text())
  assert set(report['zero_shot']) >= {'teacher', 'student_int8_static'}


@pytest.mark.slow
def test_datafree_pipeline_killed_in_every_stage_resumes_identically(
    tmp_path):
  """classifier (three teachers) and datafree_kd meet all three kills."""
  overrides = ['--config.stages[0].num_models=2',
               '--config.stages[0].num_epochs=1',
               '--config.stages[0].log_every=2',
               '--config.stages[0].ckpt_every=4',
               '--config.stages[1].epochs=2',
               '--config.stages[1].iters_per_epoch=6',
               '--config.stages[1].batch_size=16',
               '--config.stages[1].log_every=2',
               '--config.stages[1].ckpt_every=4',
               '--config.stages[1].attention.steps=4']
  faults = (_training_faults('0_teachers/model_1')
            + _training_faults('1_datafree_kd'))
  config = f'configs/datafree_kd.py:quick,data_dir={tmp_path / "tfds"}'
  run_chain(tmp_path, config, overrides, faults)


@pytest.mark.slow
def test_stage1_with_teacher_cache_killed_resumes_identically(tmp_path):
  """dual_modality_kd reading teacher embeddings from its cache."""
  overrides = ['--config.data_config=custom_32px_256_64_64',
               '--config.stop_after=dual_modality_kd',
               '--config.stages[0].num_steps=4',
               '--config.stages[2].teacher_cache.num_views=2',
               *_cadence(2), '--config.stages[2].eval_every=6']
  config = f'configs/demo.py:quick,data_dir={tmp_path / "tfds"}'
  reference, _ = run_chain(tmp_path, config, overrides,
                           _training_faults('2_dual_modality_kd'))
  assert (reference / '2_dual_modality_kd' / 'teacher_cache').is_dir()


@pytest.mark.slow
def test_distill_classifier_killed_resumes_identically(tmp_path):
  """distill_classifier with OFA branches after its classifier teacher."""
  overrides = ['--config.stages[0].num_epochs=1',
               '--config.stages[0].log_every=4',
               '--config.stages[1].num_epochs=1',
               '--config.stages[1].batch_size=64',
               '--config.stages[1].log_every=2',
               '--config.stages[1].ckpt_every=4',
               '--config.stages[1].compare_without_ofa=False']
  config = (f'configs/distill_classifier.py:quick,'
            f'data_dir={tmp_path / "tfds"}')
  run_chain(tmp_path / 'ofa', config, overrides,
            _training_faults('1_distill_classifier'))
