"""Calibrate -> convert -> serve: the flow from trained params to int8 serving.

One model class, four builds (only `QuantSpec.phase` differs), one `params`
tree (the fp32 tree: quantised layers add no params):

  spec = quant.int8(calibration='static')
  build = lambda phase: students.build(name, embed_dim=D,
                                      quant=spec.replace(phase=phase))
  m_cal, m_cvt, m_srv = build('calibrate'), build('convert'), build('serve')

  variables = {'params': params}
  variables = quant.calibrate(m_cal.apply, variables, batches)  # + quant_stats
  served = quant.convert(m_cvt.apply, variables, batches[0])    # int8 weights
  y = jax.jit(lambda v, x: quant.serve_apply(m_srv.apply, v, x))(served, x)

`y` equals `students.build(..., quant=spec).apply(variables, x)` (the
fake-quant static model). For dynamic int8 evaluation no calibration is
needed: `students.build(..., quant=quant.int8()).apply({'params': params}, x)`.
Extra apply arguments (e.g. `train=False`) go through `functools.partial`
on the apply function or as keyword arguments.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax.quant import spec as spec_lib

Variables = dict[str, Any]
ApplyFn = Callable[..., Any]

_FROZEN_VALUE_SUFFIXES = (("qrhs", "value"), ("qrhs_value",))


def calibrate(
    apply_fn: ApplyFn,
    variables: Variables,
    batches: Iterable[Any],
    *,
    jit: bool = True,
    **apply_kwargs,
) -> Variables:
  """Static activation ranges: running max of |x| over `batches`.

  Args:
    apply_fn: `model.apply` of a model built with
      `spec.replace(phase='calibrate')`, `spec.calibration == 'static'`.
    variables: {'params': ..., other collections}; an existing `quant_stats`
      collection is continued (its running max keeps growing).
    batches: iterable of model inputs, e.g. 2 batches of 32 images, each the
      concatenation [non-RGB; RGB] so both modalities set the ranges.
    jit: jit the calibration step.
    **apply_kwargs: passed to `apply_fn` (e.g. train=False).

  Returns:
    `variables` with `quant_stats` set (one (1,)*ndim `amax` per quantised
    activation).

  Raises:
    ValueError: no batch, or the model recorded no static range (it was not
      built with calibration='static', phase='calibrate').
  """
  stats = variables.get(spec_lib.QUANT_STATS, {})
  rest = {k: v for k, v in variables.items() if k != spec_lib.QUANT_STATS}

  # Variables are an argument, not a closure: closed-over params would become
  # XLA constants that it then spends seconds constant-folding.
  def step(rest, stats, batch):
    _, mutated = apply_fn({**rest, spec_lib.QUANT_STATS: stats}, batch,
                          mutable=[spec_lib.QUANT_STATS], **apply_kwargs)
    return mutated[spec_lib.QUANT_STATS]

  step_fn = jax.jit(step) if jit else step
  count = 0
  for batch in batches:
    stats = step_fn(rest, stats, batch)
    count += 1
  if count == 0:
    raise ValueError("calibrate: `batches` is empty; pass at least one batch.")
  if not jax.tree.leaves(stats):
    raise ValueError(
        "calibrate: the model recorded no static ranges; build it with "
        "quant=spec.replace(calibration='static', phase='calibrate').")
  return {**variables, spec_lib.QUANT_STATS: stats}


def _frozen_layer_paths(frozen: Any) -> list[tuple[str, ...]]:
  """Paths of the layers (Dense / Conv) whose kernel was frozen to ints."""
  paths = []
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(frozen))
  for path in flat:
    for suffix in _FROZEN_VALUE_SUFFIXES:
      if path[-len(suffix):] == suffix:
        # Drop the suffix and the quantiser module (AqtDotGeneral_0 / ...).
        paths.append(path[:-len(suffix) - 1])
  return paths


def convert(
    apply_fn: ApplyFn,
    variables: Variables,
    example_input: Any,
    **apply_kwargs,
) -> Variables:
  """Freezes int weights + per-channel scales; drops the float kernels.

  Args:
    apply_fn: `model.apply` of a model built with
      `spec.replace(phase='convert')`.
    variables: {'params', and 'quant_stats' for static specs, ...}.
    example_input: any valid input (only its shapes matter).
    **apply_kwargs: passed to `apply_fn`.

  Returns:
    served variables: `params` without the kernels of quantised layers (biases,
    norms, position tables stay float32), `aqt` with `{value: int8/int4
    (kernel shape), scale: float32 per output channel}` per quantised layer,
    and every other input collection unchanged.
  """
  _, mutated = apply_fn(variables, example_input,
                        mutable=[spec_lib.AQT_COLLECTION], **apply_kwargs)
  frozen = flax.core.unfreeze(mutated.get(spec_lib.AQT_COLLECTION, {}))
  if not _frozen_layer_paths(frozen):
    raise ValueError(
        "convert: no quantised weights were frozen; build the model with "
        "quant=spec.replace(phase='convert').")
  return drop_frozen_kernels({**variables, spec_lib.AQT_COLLECTION: frozen})


def drop_frozen_kernels(variables: Variables) -> Variables:
  """Removes `params` kernels of layers that have frozen int weights in `aqt`.

  Also works on `jax.eval_shape` output (e.g. a serve-phase model's `init`),
  which is how the served size is computed without weights.
  """
  frozen = variables.get(spec_lib.AQT_COLLECTION, {})
  params = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(variables["params"]))
  for path in _frozen_layer_paths(frozen):
    params.pop(path + ("kernel",), None)
  return {**variables, "params": flax.traverse_util.unflatten_dict(params)}


def with_kernel_placeholders(served: Variables) -> Variables:
  """Re-inserts float placeholder kernels where `convert` dropped them.

  `nn.Dense` / `nn.Conv` read their kernel param before calling the injected
  op, and Flax checks its shape; the serve-phase op never uses its value
  (AQT still traces a quantisation of it, whose result is discarded). Under
  `jax.jit` the placeholders (the int codes cast to float) are dead code that
  XLA removes.
  """
  params = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(served["params"]))
  flat = flax.traverse_util.flatten_dict(served[spec_lib.AQT_COLLECTION])
  for path in _frozen_layer_paths(served[spec_lib.AQT_COLLECTION]):
    value = next(v for p, v in flat.items()
                 if p[:len(path)] == path and p[-1].endswith("value"))
    # Derived from the int codes, not a constant: XLA would spend seconds
    # constant-folding the (dead) float quantisation of a zeros kernel.
    params.setdefault(path + ("kernel",), value.astype(jnp.float32))
  return {**served, "params": flax.traverse_util.unflatten_dict(params)}


def serve_apply(apply_fn: ApplyFn, served: Variables, *args, **kwargs) -> Any:
  """`apply_fn` (of a phase='serve' model) on converted variables.

  Wrap in `jax.jit` so the kernel placeholders cost nothing.
  """
  return apply_fn(with_kernel_placeholders(served), *args, **kwargs)


def served_nbytes(served: Variables) -> dict[str, int]:
  """Bytes of a served pytree as stored (numpy itemsize; int4 -> 1 byte).

  Returns:
    {'int_weights', 'int_weight_elems', 'scales', 'float_params', 'total',
    'msgpack'} in bytes (elems: count); 'msgpack' is the length of
    `flax.serialization.msgpack_serialize` of the tree.
  """
  out = dict(int_weights=0, int_weight_elems=0, scales=0, float_params=0)
  for col, tree in served.items():
    for leaf in jax.tree.leaves(tree):
      arr = np.asarray(leaf)
      is_int = jnp.issubdtype(arr.dtype, jnp.integer)
      if is_int and col == spec_lib.AQT_COLLECTION:
        out["int_weights"] += arr.nbytes
        out["int_weight_elems"] += arr.size
      elif col == spec_lib.AQT_COLLECTION or col == spec_lib.QUANT_STATS:
        out["scales"] += arr.nbytes
      else:
        out["float_params"] += arr.nbytes
  out["total"] = out["int_weights"] + out["scales"] + out["float_params"]
  host = jax.tree.map(np.asarray, flax.linen.meta.unbox(served))
  out["msgpack"] = len(flax.serialization.msgpack_serialize(
      flax.serialization.to_state_dict(host)))
  return out
