"""Losses: pure functions with keyword-only arguments.

`from edgevl_jax import losses; losses.dual_modality_kd_loss(...)`.
Each submodule adds one import line below.
"""
