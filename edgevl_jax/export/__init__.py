"""edgevl_jax.export.

Submodules are imported on first use, so the JAX-free ONNX path
(`edge_predict`, `predict` on an ONNX artefact) never imports jax.
"""


def __getattr__(name):
  if name in ("model_size", "size_report"):
    from edgevl_jax.export import size  # pylint: disable=g-import-not-at-top
    return getattr(size, name)
  raise AttributeError(f"module 'edgevl_jax.export' has no attribute {name!r}")
