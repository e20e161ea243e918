"""ONNX graph of the DAT++ student (models/dat.py), mirroring the Flax code.

The maps stay NHWC as in Flax (LayerNorm over the last axis); each conv is
written between two transposes (NCHW). Quantised exactly where the project
quantises: every Dense and conv (stem, LPU, down-sampling, ConvFFN depthwise,
the offset network's two convs) and both operands of q k^T and attn v of the
neighbourhood ('N') and deformable ('D') attentions, per tensor at the static
amax / 127. LayerNorm, GELU, softmax, the offsets, both bilinear samplings
(ONNX GridSample, linear, align_corners=1, zeros padding: the semantics of
`sampling.grid_sample`) and the bias tables stay float.

'N': the k x k neighbourhoods are constant Gathers of the flattened keys and
values (NATTEN's border-shifted windows), rows then columns with (L, k)
indices as the Flax code; the bias gathers the (heads, 2k-1, 2k-1) rpb table
the same way (small constants, folded by the runtime at load: the file holds
the table, not the (heads, HW, k*k) bias).
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from edgevl_jax.export.onnx_graph import Graph
from edgevl_jax.export.onnx_graph import Layer
from edgevl_jax.export.onnx_weights import Weights
from edgevl_jax.models import dat as dat_lib


def _conv(g: Graph, w: Weights, path: str, x: str, *, stride: int = 1,
          pad: int = 1, group: int = 1) -> str:
  """A Flax conv on a (B, H, W, C) map (NCHW inside)."""
  y = g.conv(g.transpose(x, (0, 3, 1, 2)), w.layer(path, conv=True),
             strides=stride, pads=(pad, pad, pad, pad), group=group)
  return g.transpose(y, (0, 2, 3, 1))


def _norm(g: Graph, w: Weights, path: str, x: str, eps: float) -> str:
  return g.layer_norm(x, w.param(f"{path}/scale"), w.param(f"{path}/bias"),
                      eps)


def _gelu(g: Graph, x: str) -> str:
  return g.op("Gelu", x, approximate="none")


def _neighbourhood(g: Graph, w: Weights, path: str, x: str, *, hw, c: int,
                   heads: int, k: int) -> str:
  """dat.NeighborhoodAttention on a (B, H, W, C) map."""
  h0, w0 = hw
  hd = c // heads
  h, wd = max(h0, k), max(w0, k)
  if (h, wd) != (h0, w0):
    x = g.op("Pad", x, g.ints([0, 0, 0, 0, 0, h - h0, wd - w0, 0]))
  n, kk = h * wd, k * k
  qkv = g.dense(x, w.layer(f"{path}/qkv"))
  qkv = g.transpose(g.reshape(qkv, (-1, n, 3, heads, hd)), (2, 0, 1, 3, 4))
  q, key, v = (g.op("Gather", qkv, g.const(np.int64(i), f"idx_{i}"), axis=0)
               for i in range(3))                        # (B, HW, heads, d)
  q = g.op("Mul", q, g.const(np.float32(hd ** -0.5)))
  keys_h, rel_h = dat_lib.neighbourhood_index(h, k)
  keys_w, rel_w = dat_lib.neighbourhood_index(wd, k)
  idx = lambda a, name: g.const(a.astype(np.int64), f"na_{name}_{len(a)}_{k}")

  def neighbourhoods(t):  # (B, HW, heads, d) -> (B, HW, k*k, heads, d)
    t = g.reshape(t, (-1, h, wd, heads, hd))
    t = g.op("Gather", g.op("Gather", t, idx(keys_h, "keys"), axis=1),
             idx(keys_w, "keys"), axis=3)             # B,H,ka,W,kb,h,d
    return g.reshape(g.transpose(t, (0, 1, 3, 2, 4, 5, 6)),
                     (-1, n, kk, heads, hd))

  q_shape, kn_shape = (1, n, heads, hd), (1, n, kk, heads, hd)
  q_amax, k_amax = w.einsum_amax(f"{path}/qk_einsum", "bnhd,bnmhd->bhnm",
                                 q_shape, kn_shape)
  # Q/DQ right at the MatMul inputs (per tensor, so the same codes as
  # before the gathers; ORT's transpose optimiser mis-types a Q it moves
  # through a Transpose in the s8s8 graph).
  kn = neighbourhoods(key)
  qh = g.reshape(g.transpose(q, (0, 2, 1, 3)), (-1, heads, n, 1, hd))
  logits = g.op("MatMul", g.quant(qh, q_amax),
                g.quant(g.transpose(kn, (0, 3, 1, 4, 2)), k_amax))
  logits = g.reshape(logits, (-1, heads, n, kk))
  bias = g.op("Gather", g.op("Gather", g.const(w.param(f"{path}/rpb")),
                             idx(rel_h, "rel"), axis=1),
              idx(rel_w, "rel"), axis=3)              # heads,H,ka,W,kb
  bias = g.reshape(g.transpose(bias, (0, 1, 3, 2, 4)), (heads, n, kk))
  probs = g.op("Softmax", g.op("Add", logits, bias), axis=-1)
  p_amax, v_amax = w.einsum_amax(f"{path}/av_einsum", "bhnm,bnmhd->bnhd",
                                 (1, heads, n, kk), kn_shape)
  vn = neighbourhoods(v)
  out = g.op("MatMul", g.quant(g.reshape(probs, (-1, heads, n, 1, kk)),
                               p_amax),
             g.quant(g.transpose(vn, (0, 3, 1, 2, 4)), v_amax))  # B,h,HW,1,d
  out = g.reshape(g.transpose(g.reshape(out, (-1, heads, n, hd)),
                              (0, 2, 1, 3)), (-1, h, wd, c))
  if (h, wd) != (h0, w0):
    out = g.slice(out, [0, 0], [h0, w0], [1, 2])
  return g.dense(out, w.layer(f"{path}/proj"))


def _dense_pair(g: Graph, x: str, a: Layer, b: Layer) -> tuple[str, str]:
  """Two Dense of one input (proj_k, proj_v): one MatMul of the concatenated
  kernels when they quantise the input alike (the same calibrated tensor,
  so the same amax), then Split. Exact: the weights are per output channel.
  ONNX Runtime leaves two DQ -> MatMul reading one shared Q float."""
  if a.quantised != b.quantised or a.amax != b.amax or (a.bias is None) != (
      b.bias is None):
    return g.dense(x, a), g.dense(x, b)
  o = (a.codes if a.quantised else a.kernel).shape[1]
  cat = lambda u, v: None if u is None else np.concatenate([u, v], axis=-1)
  both = Layer(kernel=cat(a.kernel, b.kernel), codes=cat(a.codes, b.codes),
               step=cat(a.step, b.step), bias=cat(a.bias, b.bias),
               amax=a.amax)
  y = g.dense(x, both)
  out = [g.fresh("split"), g.fresh("split")]
  g.nodes.append(helper.make_node("Split", [y, g.ints([o, o])], out,
                                  name=out[0], axis=-1))
  return out[0], out[1]


def _flip_xy(g: Graph, pos: str) -> str:
  """(..., (y, x)) -> (..., (x, y)), the GridSample order."""
  return g.op("Gather", pos, g.const(np.asarray([1, 0], np.int64), "yx_xy"),
              axis=-1)


def _grid_sample(g: Graph, x: str, grid: str) -> str:
  """NCHW map sampled at (N, Ho, Wo, (x, y)): sampling.grid_sample."""
  return g.op("GridSample", x, grid, mode="linear", padding_mode="zeros",
              align_corners=1)


def _deformable(g: Graph, w: Weights, path: str, x: str, *, hw, c: int,
                m, s: int) -> str:
  """dat.DeformableAttention on a (B, H, W, C) map."""
  h, wd = hw
  heads, groups = m.num_heads[s], m.groups[s]
  r, kern = m.offset_strides[s], m.offset_kernels[s]
  hd, cg, hpg = c // heads, c // groups, heads // groups
  q = g.dense(x, w.layer(f"{path}/proj_q"))                   # (B, H, W, C)
  qg = g.reshape(g.transpose(g.reshape(q, (-1, h, wd, groups, cg)),
                             (0, 3, 1, 2, 4)), (-1, h, wd, cg))
  # The offset network.
  pad = kern // 2 if kern != r else 0
  off = _conv(g, w, f"{path}/conv_offset/dwconv", qg, stride=r, pad=pad,
              group=cg)
  off = _gelu(g, _norm(g, w, f"{path}/conv_offset/norm", off,
                       m.layer_norm_eps))
  off = _conv(g, w, f"{path}/conv_offset/proj", off, pad=0)  # (Bg,hk,wk,2)
  hk, wk = (h + 2 * pad - kern) // r + 1, (wd + 2 * pad - kern) // r + 1
  if min(hk, wk) < 2:
    raise ValueError(f"DAT export: {hk}x{wk} reference points (needs 2x2).")
  ref = g.const(dat_lib.normalised_grid(hk, wk, 0.5)[None])
  if m.offset_range_factor >= 0:
    scale = np.asarray([1.0 / (hk - 1.0), 1.0 / (wk - 1.0)], np.float32)
    pos = g.op("Add", g.op("Mul", g.op("Tanh", off), g.const(
        scale * np.float32(m.offset_range_factor))), ref)
  else:
    pos = g.op("Clip", g.op("Add", off, ref), g.const(np.float32(-1.0)),
               g.const(np.float32(1.0)))
  ns = hk * wk
  xg = g.transpose(g.reshape(x, (-1, h, wd, groups, cg)), (0, 3, 4, 1, 2))
  xg = g.reshape(xg, (-1, cg, h, wd))                         # (Bg, cg, H, W)
  sampled = _grid_sample(g, xg, _flip_xy(g, pos))             # (Bg, cg, hk, wk)
  sampled = g.reshape(g.transpose(g.reshape(sampled, (-1, groups, cg, ns)),
                                  (0, 3, 1, 2)), (-1, ns, c))
  k, v = _dense_pair(g, sampled, w.layer(f"{path}/proj_k"),
                     w.layer(f"{path}/proj_v"))
  qh = g.transpose(g.reshape(q, (-1, h * wd, heads, hd)), (0, 2, 1, 3))
  kh = g.transpose(g.reshape(k, (-1, ns, heads, hd)), (0, 2, 3, 1))
  vh = g.transpose(g.reshape(v, (-1, ns, heads, hd)), (0, 2, 1, 3))
  q_amax, k_amax = w.einsum_amax(f"{path}/qk_einsum", "bqhd,bkhd->bhqk",
                                 (1, h * wd, heads, hd), (1, ns, heads, hd))
  logits = g.op("MatMul", g.quant(qh, q_amax), g.quant(kh, k_amax))
  logits = g.op("Mul", logits, g.const(np.float32(hd ** -0.5)))
  if m.use_rpe:
    table = w.param(f"{path}/rpe_table")                      # (heads, th, tw)
    th, tw = table.shape[1:]
    table = g.const(table.reshape(1, groups, hpg, th, tw))
    batch = g.slice(g.op("Shape", x), [0], [1], [0])
    table = g.op("Expand", table, g.op("Concat", batch, g.ints(
        [groups, hpg, th, tw]), axis=0))
    table = g.reshape(table, (-1, hpg, th, tw))
    qgrid = g.const(dat_lib.normalised_grid(h, wd, 0.0).reshape(
        1, h * wd, 1, 2))
    disp = g.op("Mul", g.op("Sub", qgrid, g.reshape(pos, (-1, 1, ns, 2))),
                g.const(np.float32(0.5)))                    # (Bg, HW, Ns, 2)
    bias = _grid_sample(g, table, _flip_xy(g, disp))          # (Bg,hpg,HW,Ns)
    logits = g.op("Add", logits, g.reshape(bias, (-1, heads, h * wd, ns)))
  probs = g.op("Softmax", logits, axis=-1)
  p_amax, v_amax = w.einsum_amax(f"{path}/av_einsum", "bhqk,bkhd->bqhd",
                                 (1, heads, h * wd, ns), (1, ns, heads, hd))
  out = g.op("MatMul", g.quant(probs, p_amax), g.quant(vh, v_amax))
  out = g.reshape(g.transpose(out, (0, 2, 1, 3)), (-1, h, wd, c))
  return g.dense(out, w.layer(f"{path}/proj_out"))


def _conv_mlp(g: Graph, w: Weights, path: str, x: str, hidden: int) -> str:
  y = g.dense(x, w.layer(f"{path}/fc1"))
  y = g.op("Add", y, _conv(g, w, f"{path}/dwconv", y, group=hidden))
  return g.dense(_gelu(g, y), w.layer(f"{path}/fc2"))


def dat(g: Graph, w: Weights, m, x: str, image_size: int) -> str:
  """DAT backbone: (B, 3, S, S) NCHW -> (B, C_last) mean of the final map."""
  specs = m.specs()
  stride, eps = m.patch_size // 2, m.layer_norm_eps
  t = g.transpose(x, (0, 2, 3, 1))
  t = _conv(g, w, "backbone/stem_conv1", t, stride=stride)
  t = _gelu(g, _norm(g, w, "backbone/stem_norm1", t, eps))
  t = _norm(g, w, "backbone/stem_norm2",
            _conv(g, w, "backbone/stem_conv2", t, stride=stride), eps)
  out = lambda n, st: (n + 2 - 3) // st + 1
  hw = (out(out(image_size, stride), stride),) * 2
  c = m.dim_stem
  for s, spec in enumerate(specs):
    if s > 0:
      t = _conv(g, w, f"backbone/stage{s - 1}_down", t, stride=2)
      t = _norm(g, w, f"backbone/stage{s - 1}_down_norm", t, eps)
      hw = (out(hw[0], 2), out(hw[1], 2))
      c = m.dims[s]
    if c != m.dims[s]:
      t = g.dense(t, w.layer(f"backbone/stage{s}_proj"))
      c = m.dims[s]
    for j, kind in enumerate(spec):
      b = f"backbone/stage{s}_block{j}"
      t = g.op("Add", t, _conv(g, w, f"{b}/lpu", t, group=c))
      y = _norm(g, w, f"{b}/norm1", t, eps)
      if kind == "N":
        y = _neighbourhood(g, w, f"{b}/attention", y, hw=hw, c=c,
                           heads=m.num_heads[s], k=m.nat_kernels[s])
      else:
        y = _deformable(g, w, f"{b}/attention", y, hw=hw, c=c, m=m, s=s)
      t = g.op("Add", t, y)
      t = g.op("Add", t, _conv_mlp(g, w, f"{b}/mlp",
                                   _norm(g, w, f"{b}/norm2", t, eps),
                                   int(m.mlp_ratio * c)))
  return g.mean(_norm(g, w, "backbone/norm", t, eps), (1, 2))
