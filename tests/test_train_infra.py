"""Unit tests of the training infrastructure (mesh, state, optimiser,
checkpoint, metrics, loop, config helpers, registry, pipeline)."""
import functools
import json
import os
import pathlib
import signal
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from edgevl_jax.models import layers  # noqa: E402
from edgevl_jax.run import checkpoint as checkpoint_lib  # noqa: E402
from edgevl_jax.run import config as config_lib  # noqa: E402
from edgevl_jax.run import loop  # noqa: E402
from edgevl_jax.run import mesh as mesh_lib  # noqa: E402
from edgevl_jax.run import metrics as metrics_lib  # noqa: E402
from edgevl_jax.run import registry  # noqa: E402
from edgevl_jax.run import optim as optim_lib  # noqa: E402
from edgevl_jax.run import plots  # noqa: E402
from edgevl_jax.run import state as state_lib  # noqa: E402
from tests import toy_trainer  # noqa: E402


def test_weight_decay_mask_follows_the_documented_rule():
  params = {
      'patch_embed': {'kernel': jnp.zeros((4, 4, 3, 8)), 'bias': jnp.zeros(8)},
      'pos_embed': jnp.zeros((1, 5, 8)),
      'cls_token': jnp.zeros((1, 1, 8)),
      'class_embedding': jnp.zeros((8, 8)),
      'block0': {
          'LayerNorm_0': {'scale': jnp.zeros(8), 'bias': jnp.zeros(8)},
          'norm1': {'scale': jnp.zeros(8)},
          'attn': {'relative_position_bias_table': jnp.zeros((9, 2)),
                   'qkv': {'kernel': jnp.zeros((8, 24))}},
          'mlp': {'Dense_0': {'kernel': jnp.zeros((8, 16)),
                              'bias': jnp.zeros(16)}},
          'gain': jnp.zeros(8),
      },
      'head': {'kernel': jnp.zeros((8, 10))},
  }
  mask = optim_lib.weight_decay_mask(params)
  decayed = {'/'.join(str(k.key) for k in p)
             for p, v in jax.tree_util.tree_flatten_with_path(mask)[0] if v}
  assert decayed == {'patch_embed/kernel', 'block0/attn/qkv/kernel',
                     'block0/mlp/Dense_0/kernel', 'head/kernel'}


def _adamw_config(**kw):
  cfg = dict(name='adamw', lr=1e-4, end_lr=5e-6, weight_decay=1e-3,
             grad_clip_norm=5.0)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def test_cosine_schedule_endpoints_and_warmup():
  sched = optim_lib.make_schedule(_adamw_config(), 100)
  assert float(sched(0)) == pytest.approx(1e-4, rel=1e-6)
  assert float(sched(50)) == pytest.approx((1e-4 + 5e-6) / 2, rel=1e-5)
  assert float(sched(100)) == pytest.approx(5e-6, rel=1e-5)
  warm = optim_lib.make_schedule(_adamw_config(warmup_steps=10), 110)
  assert float(warm(0)) == 0.0
  assert float(warm(10)) == pytest.approx(1e-4, rel=1e-6)
  assert float(warm(110)) == pytest.approx(5e-6, rel=1e-5)
  step = optim_lib.make_schedule(ml_collections.ConfigDict(dict(
      name='sgd', lr=0.1, schedule='step', milestones=(100, 200))), 300)
  np.testing.assert_allclose([float(step(s)) for s in (0, 99, 100, 200, 299)],
                             [0.1, 0.1, 0.01, 0.001, 0.001], rtol=1e-6)


def test_adamw_decays_only_masked_params_and_clips():
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}
  tx = optim_lib.make_optimizer(
      _adamw_config(lr=0.1, end_lr=0.1, weight_decay=0.5), 10)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # Zero gradients: only decoupled weight decay moves the kernel (lr * wd).
  np.testing.assert_allclose(updates['dense']['kernel'], -0.05, rtol=1e-6)
  np.testing.assert_allclose(updates['dense']['bias'], 0.0)
  clip = optim_lib.make_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', lr=1.0, schedule='constant', momentum=0.0,
      grad_clip_norm=1.0)), 10)
  big = {'dense': {'kernel': jnp.full((2, 2), 3.0), 'bias': jnp.zeros(2)}}
  updates, _ = clip.update(big, clip.init(params), params)
  assert float(jnp.sqrt(sum(jnp.sum(u**2) for u in jax.tree.leaves(
      updates)))) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize('bad, key', [
    (dict(name='rmsprop'), 'optim.name'),
    (dict(lr=-1.0), 'optim.lr'),
    (dict(schedule='step', milestones=(20, 10)), 'optim.milestones'),
])
def test_optimizer_config_errors_name_the_key(bad, key):
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    optim_lib.make_optimizer(_adamw_config(**bad), 10)


def test_make_mesh_sizes_and_errors():
  mesh = mesh_lib.make_mesh({'data': -1, 'fsdp': 4})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  assert dict(mesh_lib.make_mesh(None).shape) == {'data': 8, 'fsdp': 1}
  with pytest.raises(ValueError, match='uses 6 devices but 8'):
    mesh_lib.make_mesh({'data': 3, 'fsdp': 2})
  with pytest.raises(ValueError, match="unknown axes \\['model'\\]"):
    mesh_lib.make_mesh({'model': 2})
  with pytest.raises(ValueError, match='batch size 12 is not divisible by '
                     'the 8 devices'):
    mesh_lib.shard_batch({'x': np.zeros((12, 3))}, mesh)


def _toy_config(**kw):
  config = toy_trainer.get_config()
  config.unlock()
  config.update(kw)
  return config


def test_sharded_step_matches_single_device_step():
  config = _toy_config()
  batch = next(toy_trainer.NumpyStream(0, 16))
  results = []
  for mesh in (mesh_lib.make_mesh({'data': 1, 'fsdp': 1},
                                  devices=jax.devices()[:1]),
               mesh_lib.make_mesh({'data': 2, 'fsdp': 4})):
    _, state, shardings, step = toy_trainer.setup(config, mesh)
    state, metrics = step(state, mesh_lib.shard_batch(batch, mesh))
    results.append((float(metrics['loss']), jax.device_get(state.params),
                    shardings))
  (loss1, params1, _), (loss8, params8, sh8) = results
  # The fsdp axis really splits the kernels on the 8-device mesh.
  assert sh8.params['Dense_0']['kernel'].spec[0] == 'fsdp'
  assert loss1 == pytest.approx(loss8, abs=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               params1, params8)


def test_fit_logs_checkpoints_and_nan_guard_keeps_last_good(tmp_path):
  config = _toy_config(num_steps=40, nan_at_step=23)
  with pytest.raises(loop.NonFiniteError,
                     match=r'Non-finite loss=nan at step 23.*checkpoints/20'):
    toy_trainer.train_and_evaluate(config, str(tmp_path))
  records = metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == [5, 10, 15, 20]
  assert not (tmp_path / 'report.json').exists()
  ckpt = checkpoint_lib.Checkpointer(tmp_path / 'checkpoints')
  assert ckpt.latest_step() == 20
  mesh = mesh_lib.make_mesh(config.mesh)
  _, fresh, _, _ = toy_trainer.setup(config, mesh)
  stream = toy_trainer.NumpyStream(0, 16)
  restored, _ = ckpt.restore_latest(fresh, stream)
  assert int(restored.step) == 20 and stream.index == 20
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))
  ckpt.close()


def test_restore_ignores_unfinished_save_and_names_mismatching_key(tmp_path):
  mesh = mesh_lib.make_mesh(None)
  _, state, _, _ = toy_trainer.setup(_toy_config(), mesh)
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(state, step=3, extras={'best': 0.5})
  # What a kill in the middle of saving step 7 leaves behind.
  (tmp_path / '7.orbax-checkpoint-tmp-1234' / 'state').mkdir(parents=True)
  (tmp_path / '7.orbax-checkpoint-tmp-1234' / 'state' / 'junk').write_text('x')
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3
    restored, extras = ckpt.restore_latest(state)
    assert extras == {'best': 0.5}
    np.testing.assert_array_equal(restored.params['Dense_0']['kernel'],
                                  state.params['Dense_0']['kernel'])
    _, wider, _, _ = toy_trainer.setup(_toy_config(hidden=48), mesh)
    with pytest.raises(ValueError, match=r"params\.Dense_0\.bias.*\(32,\).*"
                       r"expects \(48,\)"):
      ckpt.restore_latest(wider)
  params = checkpoint_lib.load_params(tmp_path)
  np.testing.assert_array_equal(params['Dense_1']['kernel'],
                                np.asarray(state.params['Dense_1']['kernel']))


def test_metric_writer_report_and_plots(tmp_path):
  with metrics_lib.MetricWriter(tmp_path, total_steps=4) as writer:
    for s in (1, 2, 3):
      writer.write(s, {'loss': np.float32(3.0 - s), 'acc': jnp.asarray(0.1)})
      writer.progress(s)
    writer.write(2, {'loss': 9.0, 'acc': 0.2})  # a resumed run rewrites step 2
  records = metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [(r['step'], r['loss']) for r in records] == [(1, 2.0), (2, 9.0),
                                                       (3, 0.0)]
  assert any(p.name.startswith('events') for p in (tmp_path / 'tb').iterdir())
  metrics_lib.write_report(tmp_path, {'zero_shot': {'teacher': {
      'rgb': np.float32(0.5)}}})
  assert json.loads((tmp_path / 'report.json').read_text()) == {
      'zero_shot': {'teacher': {'rgb': 0.5}}}
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.tmp-')]
  png = plots.plot_curves(tmp_path / 'metrics.jsonl', tmp_path / 'c.png')
  bars = plots.plot_accuracy_table(
      {'teacher': {'rgb': 0.9, 'depth': 0.3},
       'student_int8': {'rgb': 0.8, 'depth': 0.7}}, tmp_path / 'acc.png')
  assert os.path.getsize(png) > 1000 and os.path.getsize(bars) > 1000


def test_parse_arg_and_require():
  args = config_lib.parse_arg('quick,student=vit_s16,res=128', quick=False,
                                student='vit_t', res=224, lr=1e-3)
  assert args.to_dict() == {'quick': True, 'student': 'vit_s16', 'res': 128,
                            'lr': 1e-3}
  with pytest.raises(ValueError, match="Unknown config arg 'bogus'"):
    config_lib.parse_arg('bogus', quick=False)
  with pytest.raises(ValueError, match="'res': expected an int"):
    config_lib.parse_arg('res=big', res=224)
  config = ml_collections.ConfigDict({'optim': {'name': 'lamb'}, 'n': 0})
  with pytest.raises(ValueError, match=r"config\.optim\.name must be one of"):
    config_lib.require(config, 'optim.name', allowed=('adamw', 'sgd'))
  with pytest.raises(ValueError, match=r'config\.n must be a positive int'):
    config_lib.require_positive(config, 'n', integer=True)
  with pytest.raises(ValueError, match=r'config\.missing is missing'):
    config_lib.require(config, 'missing')
  assert config_lib.diff_keys({'a': 1, 'b': {'c': 2}},
                                {'a': 1, 'b': {'c': 3}, 'd': 0}) == ['b.c', 'd']


def test_registry_resolves_and_rejects():
  assert registry.get_job('tests.toy_trainer') is toy_trainer
  assert registry.module_name('dual_modality_kd') == (
      'edgevl_jax.jobs.dual_modality_kd')
  # Old names of the previous layout keep working for one release.
  assert registry.module_name('evaluate') == 'edgevl_jax.jobs.zero_shot_eval'
  assert registry.module_name('export_stage') == 'edgevl_jax.jobs.export'
  with pytest.raises(ValueError, match="config.trainer='nope' is not a job"):
    registry.get_job('nope')
  with pytest.raises(ValueError, match='needs defaults'):
    registry.get_job('edgevl_jax.run.mesh')
  # Every job's schema has the run keys and its own, each documented.
  for job in registry.JOBS:
    schema = registry.schema(job)
    assert {'seed', 'log_every', 'max_to_keep', 'mesh'} <= set(schema)
    lines = config_lib.describe(schema)
    assert all('  # ' in line and not line.endswith('# ') for line in lines)


def _pipeline_config():
  a = _toy_config(num_steps=4, log_every=2, ckpt_every=2)
  b = _toy_config(num_steps=6, log_every=2, ckpt_every=2)
  a.name = 'first'
  # seed is resolved from the first stage's report.
  b = ml_collections.ConfigDict({**b.to_dict(), 'name': 'second',
                                 'seed': '@first/steps'})
  return ml_collections.ConfigDict({'trainer': 'pipeline', 'stages': [a, b]})


def test_pipeline_runs_stages_resolves_references_and_skips_on_rerun(
    tmp_path):
  config = _pipeline_config()
  report = toy_trainer.train_and_evaluate(config, str(tmp_path))
  assert set(report['stages']) == {'first', 'second'}
  assert report['steps'] == 6  # later stage wins in the merged report
  assert report['seconds']['first'] > 0 and report['seconds']['second'] > 0
  saved = json.loads((tmp_path / '1_second' / 'resolved_config.json')
                     .read_text())
  assert saved['seed'] == 4
  lines = (tmp_path / '0_first' / 'metrics.jsonl').read_text()
  rerun = toy_trainer.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / '0_first' / 'metrics.jsonl').read_text() == lines
  assert rerun['seconds'] == report['seconds']
  assert rerun['stages'] == report['stages']
  stages = metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl', dedupe=False)
  assert [(r['step'], r['stage'], r['skipped']) for r in stages] == [
      (0, 'first', False), (1, 'second', False), (0, 'first', True),
      (1, 'second', True)]


def test_pipeline_validation_names_the_bad_stage():
  config = _pipeline_config()
  config.stages[1].seed = '@later/steps'
  with pytest.raises(ValueError, match=r"stages\[1\]\.seed='@later/steps' "
                     "refers to stage 'later'"):
    registry.validate(config)
  config = _pipeline_config()
  config.stages[0].num_steps = 0
  with pytest.raises(ValueError, match=r'stages\[0\] \(first\): config\.'
                     r'num_steps must be a positive int'):
    registry.validate(config)


class _BNModel(nn.Module):
  """Conv + layers.BatchNorm: exercises a non-empty model_state."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.conv(8, (3, 3), ops=layers.Ops())(x)
    x = layers.BatchNorm()(x, use_running_average=not train)
    return jnp.mean(x, axis=(1, 2))


def test_shard_params_and_batch_stats_state_through_fit(tmp_path):
  mesh = mesh_lib.make_mesh({'data': 2, 'fsdp': 4})
  model = _BNModel()
  x = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype(np.float32)
  # Teacher-style: params born sharded, conv kernels split over fsdp.
  variables, shardings = mesh_lib.shard_params(
      functools.partial(model.init, train=False), jax.random.PRNGKey(0), x,
      mesh=mesh)
  kernel = variables['params']['Conv_0']['kernel']
  assert shardings['params']['Conv_0']['kernel'].spec[-1] == 'fsdp'
  assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 2)

  tx = optim_lib.make_optimizer(_adamw_config(lr=1e-2), 6)
  state, sh = state_lib.create_train_state(
      lambda k: model.init(k, x, train=False), tx, jax.random.PRNGKey(1),
      mesh=mesh)
  assert set(state.model_state) == {'batch_stats'}

  def train_step(state, batch):
    def loss_fn(params):
      out, updates = model.apply({'params': params, **state.model_state},
                                 batch, train=True, mutable=['batch_stats'])
      return jnp.mean(jnp.square(out - 1.0)), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    return state.apply_gradients(grads, model_state=updates), {'loss': loss}

  step = mesh_lib.jit_sharded(
      train_step, in_shardings=(sh, mesh_lib.batch_sharding(mesh)),
      out_shardings=(sh, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  evals = []

  def eval_fn(s):
    evals.append(int(s.step))
    return {'mean_var': jnp.mean(s.model_state['batch_stats']['BatchNorm_0'][
        'bn']['var'])}

  with checkpoint_lib.Checkpointer(tmp_path / 'ckpt') as ckpt:
    state, summary = loop.fit(
        state, step, iter([x] * 6), num_steps=6, checkpointer=ckpt,
        log_every=2, eval_fn=eval_fn, eval_every=4,
        prepare_batch=functools.partial(mesh_lib.shard_batch, mesh=mesh))
    assert ckpt.all_steps() == [6]
  assert evals == [4, 6]
  assert summary['eval/mean_var'] != 1.0  # running stats moved off the init
  assert summary['loss'] < float(jnp.mean(jnp.square(
      model.apply(variables, x, train=False) - 1.0)))


def test_sigterm_checkpoints_the_current_step_and_stops(tmp_path):
  config = _toy_config(num_steps=40)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, state, _, step = toy_trainer.setup(config, mesh)
  stream = toy_trainer.NumpyStream(0, 16)

  def batches():
    for batch in stream:
      if stream.index == 13:  # the scheduler's notice arrives during step 13
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  previous = signal.getsignal(signal.SIGTERM)
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(loop.Preempted, match='at step 13'):
      loop.fit(state, step, batches(), num_steps=40, checkpointer=ckpt,
               data_iterator=stream, ckpt_every=10,
               prepare_batch=functools.partial(mesh_lib.shard_batch,
                                               mesh=mesh))
    assert ckpt.all_steps() == [10, 13]
    _, fresh, _, _ = toy_trainer.setup(config, mesh)
    resumed = toy_trainer.NumpyStream(0, 16)
    restored, _ = ckpt.restore_latest(fresh, resumed)
  assert int(restored.step) == 13 and resumed.index == 13
  assert signal.getsignal(signal.SIGTERM) is previous


def test_unreadable_checkpoint_folder_is_named(tmp_path):
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save({'w': jnp.ones(3)}, step=1)
  # A hand-made or truncated step folder that orbax lists but cannot read.
  (tmp_path / '5' / 'state').mkdir(parents=True)
  (tmp_path / '5' / 'state' / 'junk').write_text('x')
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match=f'Checkpoint {tmp_path}/5 is '
                       'unreadable'):
      ckpt.restore(5, {'w': jnp.ones(3)})
    # restore_latest falls back to the intact step 1 (tests/
    # test_checkpoint_faults.py covers each kind of damage).
    restored, _ = ckpt.restore_latest({'w': jnp.zeros(3)})
  np.testing.assert_array_equal(restored['w'], np.ones(3))
  with pytest.raises(ValueError, match='No checkpoint folder'):
    checkpoint_lib.load_params(tmp_path / 'missing')
