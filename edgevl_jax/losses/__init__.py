"""Losses: pure functions with keyword-only arguments.

`from edgevl_jax import losses; losses.dual_modality_kd_loss(...)`.
Each submodule adds one import line below.
"""
from edgevl_jax.losses.distill import dual_modality_kd_loss, l2_normalize
from edgevl_jax.losses.contrastive import dual_modality_triplet_loss, offline_semi_hard_triplets, online_semi_hard_triplet_loss, semi_hard_negative_mask, triplet_margin_loss
from edgevl_jax.losses.datafree import bn_statistics_loss, datafree_generator_loss, datafree_student_loss, teacher_bn_moments
from edgevl_jax.losses.kd import kl_distill, softmax_cross_entropy
from edgevl_jax.losses.ofa import ofa_loss
from edgevl_jax.losses.unicl import clip_loss, unicl_loss
