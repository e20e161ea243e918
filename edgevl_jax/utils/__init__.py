"""Tiny helpers every library may import (stdlib and numpy only).

Nothing here imports another edgevl_jax module, so data, models, analysis,
eval, export and train can all use it without an import cycle.
"""
