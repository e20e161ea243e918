"""ONNX graphs of the transformer students (ViT, Swin), mirroring the Flax code.

Each writer takes the Graph, the Weights, the backbone module (its fields:
depth, heads, window, ...) and the NCHW normalised image tensor name, and
returns the name of the (B, C) pooled feature. Quantised exactly where the
project quantises: every Dense / conv input, both operands of q k^T and of
attn v (per tensor, static amax / 127); LayerNorm, softmax, GELU, position
tables and biases stay float.
"""
from __future__ import annotations

import numpy as np

from edgevl_jax.export.onnx_graph import Graph
from edgevl_jax.export.onnx_weights import Weights
from edgevl_jax.models import swin as swin_lib


def attention(g: Graph, w: Weights, path: str, x: str, *, width: int,
              heads: int, bias: str | None = None,
              mask: str | None = None, num_windows: int = 1,
              tokens: int = 0) -> str:
  """(B', N, C) -> (B', N, C) multi-head self-attention (vit.Attention).

  bias: (1, heads, N, N) additive logits; mask: (nW, 1, N, N) added per
  window, B' = B * nW windows in batch-major order.
  """
  d = width // heads
  qkv = g.dense(x, w.layer(f"{path}/qkv"))
  qkv = g.transpose(g.reshape(qkv, (0, 0, 3, heads, d)), (2, 0, 3, 1, 4))
  q, k, v = (g.op("Gather", qkv, g.const(np.int64(i), f"idx_{i}"), axis=0)
             for i in range(3))
  shape = (1, tokens or 1, heads, d)
  q_amax, k_amax = w.einsum_amax(f"{path}/qk_einsum", "bqhd,bkhd->bhqk",
                                 shape, shape)
  logits = g.op("MatMul", g.quant(q, q_amax),
                g.quant(g.transpose(k, (0, 1, 3, 2)), k_amax))
  logits = g.op("Mul", logits, g.const(np.float32(d ** -0.5)))
  if bias is not None:
    logits = g.op("Add", logits, bias)
  if mask is not None:
    n = tokens
    per_window = g.reshape(logits, (-1, num_windows, heads, n, n))
    logits = g.reshape(g.op("Add", per_window, mask), (-1, heads, n, n))
  probs = g.op("Softmax", logits, axis=-1)
  p_amax, v_amax = w.einsum_amax(
      f"{path}/av_einsum", "bhqk,bkhd->bqhd",
      (1, heads, tokens or 1, tokens or 1), shape)
  out = g.op("MatMul", g.quant(probs, p_amax), g.quant(v, v_amax))
  out = g.reshape(g.transpose(out, (0, 2, 1, 3)), (0, 0, width))
  return g.dense(out, w.layer(f"{path}/proj"))


def mlp(g: Graph, w: Weights, path: str, x: str) -> str:
  y = g.op("Gelu", g.dense(x, w.layer(f"{path}/fc1")), approximate="none")
  return g.dense(y, w.layer(f"{path}/fc2"))


def _norm(g: Graph, w: Weights, path: str, x: str, eps: float) -> str:
  return g.layer_norm(x, w.param(f"{path}/scale"), w.param(f"{path}/bias"),
                      eps)


def vit(g: Graph, w: Weights, m, x: str) -> str:
  """ViT backbone: (B, 3, S, S) -> (B, width) mean of the final tokens."""
  p, c, eps = m.patch_size, m.width, m.layer_norm_eps
  t = g.conv(x, w.layer("backbone/patch_embed", conv=True), strides=p,
             pads=(0, 0, 0, 0))
  t = g.transpose(g.reshape(t, (0, c, -1)), (0, 2, 1))     # (B, N, C)
  batch = g.slice(g.op("Shape", t), [0], [1], [0])
  cls = g.op("Expand", g.const(w.param("backbone/cls_token")),
             g.op("Concat", batch, g.ints([1, c]), axis=0))
  t = g.op("Add", g.op("Concat", cls, t, axis=1),
           g.const(w.param("backbone/pos_embed")))
  for i in range(m.depth):
    b = f"backbone/block{i}"
    y = attention(g, w, f"{b}/attn", _norm(g, w, f"{b}/norm1", t, eps),
                  width=c, heads=m.num_heads)
    t = g.op("Add", t, y)
    t = g.op("Add", t, mlp(g, w, f"{b}/mlp", _norm(g, w, f"{b}/norm2", t,
                                                    eps)))
  return g.mean(_norm(g, w, "backbone/norm", t, eps), (1,))


def _roll(g: Graph, x: str, shift: int, h: int, w: int) -> str:
  """jnp.roll(x, (shift, shift), axis=(1, 2)) of a (B, H, W, C) map."""
  for axis, n in ((1, h), (2, w)):
    s = shift % n
    if s:
      x = g.op("Concat", g.slice(x, [n - s], [n], [axis]),
               g.slice(x, [0], [n - s], [axis]), axis=axis)
  return x


def _swin_block(g: Graph, w: Weights, path: str, x: str, *, hw, c: int,
                heads: int, window: int, shift: int, eps: float) -> str:
  """swin.SwinBlock on a (B, H, W, C) map."""
  h, wd = hw
  hp, wp = h + (-h) % window, wd + (-wd) % window
  y = _norm(g, w, f"{path}/norm1", x, eps)
  if (hp, wp) != (h, wd):
    y = g.op("Pad", y, g.ints([0, 0, 0, 0, 0, hp - h, wp - wd, 0]))
  if shift:
    y = _roll(g, y, -shift, hp, wp)
  n = window * window
  win = g.reshape(y, (-1, hp // window, window, wp // window, window, c))
  win = g.reshape(g.transpose(win, (0, 1, 3, 2, 4, 5)), (-1, n, c))
  index = swin_lib.relative_position_index(window).reshape(-1)
  table = g.const(w.param(f"{path}/relative_position_bias_table"))
  bias = g.op("Gather", table, g.const(index.astype(np.int64),
                                       f"relpos_{window}"), axis=0)
  bias = g.transpose(g.reshape(bias, (1, n, n, heads)), (0, 3, 1, 2))
  mask, num_windows = None, 1
  if shift:
    regions = swin_lib.shifted_window_mask(hp, wp, window, shift) != 0
    num_windows = regions.shape[0]
    # Stored as bytes: the -100 mask of every shifted block of a stage.
    mask = g.op("Mul", g.op("Cast", g.const(
        regions[:, None].astype(np.uint8), f"mask_{hp}_{wp}_{window}_{shift}"),
        to=1), g.const(np.float32(-100.0), "mask_value"))
  y = attention(g, w, f"{path}/attn", win, width=c, heads=heads, bias=bias,
                mask=mask, num_windows=num_windows, tokens=n)
  y = g.reshape(y, (-1, hp // window, wp // window, window, window, c))
  y = g.reshape(g.transpose(y, (0, 1, 3, 2, 4, 5)), (-1, hp, wp, c))
  if shift:
    y = _roll(g, y, shift, hp, wp)
  if (hp, wp) != (h, wd):
    y = g.slice(y, [0, 0], [h, wd], [1, 2])
  x = g.op("Add", x, y)
  return g.op("Add", x, mlp(g, w, f"{path}/mlp",
                            _norm(g, w, f"{path}/norm2", x, eps)))


def _merge(g: Graph, w: Weights, path: str, x: str, hw, c: int) -> str:
  """swin.PatchMerging: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
  h, wd = hw
  if h % 2 or wd % 2:
    x = g.op("Pad", x, g.ints([0, 0, 0, 0, 0, h % 2, wd % 2, 0]))
    h, wd = h + h % 2, wd + wd % 2
  parts = [g.slice(x, [i, j], [h, wd], [1, 2], [2, 2])
           for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]
  x = g.op("Concat", *parts, axis=-1)
  x = _norm(g, w, f"{path}/norm", x, 1e-5)
  return g.dense(x, w.layer(f"{path}/reduction"))


def swin(g: Graph, w: Weights, m, x: str, image_size: int) -> str:
  """Swin backbone: (B, 3, S, S) -> (B, C_last) mean of the final map."""
  p, c, eps = m.patch_size, m.width, m.layer_norm_eps
  t = g.conv(x, w.layer("backbone/patch_embed", conv=True), strides=p,
             pads=(0, 0, 0, 0))
  t = g.transpose(t, (0, 2, 3, 1))                         # (B, H, W, C)
  t = _norm(g, w, "backbone/patch_norm", t, 1e-5)
  hw = (image_size // p, image_size // p)
  for s, (depth, heads) in enumerate(zip(m.depths, m.num_heads)):
    if s > 0:
      t = _merge(g, w, f"backbone/stage{s - 1}_merge", t, hw, c)
      hw, c = ((hw[0] + 1) // 2, (hw[1] + 1) // 2), 2 * c
    side = min(hw)
    window = min(side, m.window_size)
    for j in range(depth):
      shift = m.window_size // 2 if j % 2 and side > m.window_size else 0
      t = _swin_block(g, w, f"backbone/stage{s}_block{j}", t, hw=hw, c=c,
                      heads=heads, window=window, shift=shift, eps=eps)
  return g.mean(_norm(g, w, "backbone/norm", t, eps), (1, 2))
