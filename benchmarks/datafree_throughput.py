"""Data-free distillation throughput: JAX (this project) vs plain PyTorch.

One iteration = 5 student steps (fresh z each: generator -> 3 frozen
teachers -> multi-head student, SGD update) + 1 generator step (generator ->
teachers with BN input statistics -> student -> L_G, Adam update), at 32 px
with three ResNet-34 teachers (CIFAR stem) and the ResNet-18 multi-head
student, as in CDFKD-MFS on CIFAR-100. Both implementations run in the same
process on the same CPU threads; the PyTorch one is written out below.

  python benchmarks/datafree_throughput.py --batch=64 --iters=3
Prints a table and writes JSON (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import torch
from torch import nn as tnn
import torch.nn.functional as F

from edgevl_jax.models import generator as generator_lib
from edgevl_jax.models import multihead
from edgevl_jax.models import students
from edgevl_jax.datafree import iteration as datafree_kd
from edgevl_jax.run import registry
from edgevl_jax.run import mesh as mesh_lib


# ----------------------------- PyTorch reference -----------------------------
class TorchGenerator32(tnn.Module):
  """The 32 px generator of the spec (BN eps 0.8 quirk, batch statistics)."""

  def __init__(self, nz=256, ngf=128):
    super().__init__()
    self.ngf = ngf
    self.l1 = tnn.Linear(nz, ngf * 8 * 8)
    self.bn0 = tnn.BatchNorm2d(ngf)
    self.conv1 = tnn.Conv2d(ngf, ngf, 3, padding=1)
    self.bn1 = tnn.BatchNorm2d(ngf, 0.8)
    self.conv2 = tnn.Conv2d(ngf, ngf // 2, 3, padding=1)
    self.bn2 = tnn.BatchNorm2d(ngf // 2, 0.8)
    self.conv3 = tnn.Conv2d(ngf // 2, 3, 3, padding=1)
    self.bn3 = tnn.BatchNorm2d(3, affine=False)

  def forward(self, z):
    x = self.bn0(self.l1(z).view(z.shape[0], self.ngf, 8, 8))
    x = F.leaky_relu(self.bn1(self.conv1(F.interpolate(x, scale_factor=2))),
                     0.2)
    x = F.leaky_relu(self.bn2(self.conv2(F.interpolate(x, scale_factor=2))),
                     0.2)
    return self.bn3(torch.tanh(self.conv3(x)))


class TorchBlock(tnn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.c1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.b1 = tnn.BatchNorm2d(cout)
    self.c2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.b2 = tnn.BatchNorm2d(cout)
    self.short = None
    if stride != 1 or cin != cout:
      self.short = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                  tnn.BatchNorm2d(cout))

  def forward(self, x):
    y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
    return F.relu(y + (x if self.short is None else self.short(x)))


class TorchResNet(tnn.Module):
  """CIFAR-stem ResNet; forward returns the stage outputs u1..u4."""

  def __init__(self, blocks):
    super().__init__()
    self.stem = tnn.Sequential(tnn.Conv2d(3, 64, 3, 1, 1, bias=False),
                               tnn.BatchNorm2d(64), tnn.ReLU())
    stages, cin = [], 64
    for s, (n, c) in enumerate(zip(blocks, (64, 128, 256, 512))):
      layers_ = []
      for j in range(n):
        layers_.append(TorchBlock(cin, c, 2 if (s > 0 and j == 0) else 1))
        cin = c
      stages.append(tnn.Sequential(*layers_))
    self.stages = tnn.ModuleList(stages)

  def forward(self, x):
    x, out = self.stem(x), []
    for stage in self.stages:
      x = stage(x)
      out.append(x)
    return out


class TorchTeacher(tnn.Module):
  def __init__(self, num_classes):
    super().__init__()
    self.trunk = TorchResNet((3, 4, 6, 3))
    self.fc = tnn.Linear(512, num_classes)

  def forward(self, x):
    f = self.trunk(x)[-1].mean((2, 3))
    return self.fc(f), f


def torch_sepconv(cin, cout):
  return tnn.Sequential(
      tnn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False),
      tnn.Conv2d(cin, cin, 1, bias=False), tnn.BatchNorm2d(cin), tnn.ReLU(),
      tnn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False),
      tnn.Conv2d(cin, cout, 1, bias=False), tnn.BatchNorm2d(cout), tnn.ReLU())


class TorchMultiHead(tnn.Module):
  def __init__(self, num_heads, num_classes):
    super().__init__()
    self.trunk = TorchResNet((2, 2, 2, 2))
    self.heads = tnn.ModuleList()
    for _ in range(num_heads):
      self.heads.append(tnn.ModuleList([
          torch_sepconv(64, 128), torch_sepconv(256, 256),
          torch_sepconv(512, 512), torch_sepconv(1024, 512),
          tnn.Linear(512, num_classes)]))

  def forward(self, x):
    u = self.trunk(x)
    logits, feats = [], []
    for e1, e2, e3, e4, fc in self.heads:
      a = e1(u[0])
      a = e2(torch.cat([u[1], a], 1))
      a = e3(torch.cat([u[2], a], 1))
      f = e4(torch.cat([u[3], a], 1)).mean((2, 3))
      logits.append(fc(f))
      feats.append(f)
    return torch.stack(logits), torch.stack(feats)


def torch_iteration_fn(batch, num_classes, nz=256):
  """Returns a closure running one PyTorch iteration."""
  gen, student = TorchGenerator32(nz), TorchMultiHead(3, num_classes)
  teachers = [TorchTeacher(num_classes).eval() for _ in range(3)]
  for t in teachers:
    t.requires_grad_(False)
  s_opt = torch.optim.SGD(student.parameters(), 0.1, momentum=0.9,
                          weight_decay=5e-4)
  g_opt = torch.optim.Adam(gen.parameters(), 1e-3)
  moments = []

  def hook(module, inputs, _):
    x = inputs[0]
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    moments.append(torch.norm(module.running_var - var)
                   + torch.norm(module.running_mean - mean))
  bns = [[m for m in t.modules() if isinstance(m, tnn.BatchNorm2d)]
         for t in teachers]
  for group in bns:
    for m in group:
      m.register_forward_hook(hook)

  def teachers_out(x):
    outs = [t(x) for t in teachers]
    return (torch.stack([o[0] for o in outs]),
            torch.stack([o[1] for o in outs]))

  def iteration():
    student.train()
    for _ in range(5):
      with torch.no_grad():
        x = gen(torch.randn(batch, nz))
        t_logits, t_feat = teachers_out(x)
      moments.clear()
      s_logits, s_feat = student(x)
      loss = ((s_logits - t_logits).abs().mean()
              + 0.2 * (s_feat - t_feat).abs().sum(-1).mean()
              + 5.0 * (s_logits.mean(0) - t_logits.mean(0)).abs().mean())
      s_opt.zero_grad()
      loss.backward()
      s_opt.step()
    moments.clear()
    x = gen(torch.randn(batch, nz))
    t_logits, _ = teachers_out(x)
    s_logits, _ = student(x)
    per_layer = len(bns[0])
    bn = sum((5.0 if i % per_layer == 0 else 1.0) * r
             for i, r in enumerate(moments))
    adv = (s_logits - t_logits).abs().mean((1, 2)).sum() / 3
    g_loss = -adv + 0.1 * bn / 3
    g_opt.zero_grad()
    g_loss.backward()
    g_opt.step()
    return float(g_loss)
  return iteration


# ------------------------------------ JAX ------------------------------------
def jax_iteration_fn(batch, num_classes):
  """Returns a closure running one jitted JAX iteration (blocking)."""
  config = registry.job_config(
      "datafree_kd", seed=0, batch_size=batch, epochs=300, iters_per_epoch=50,
      student_steps=5,
      student_optim=dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                         schedule="step", milestones=(100, 200)),
      generator_optim=dict(name="adam", lr=1e-3, schedule="step",
                           milestones=(100, 200)),
      generator=dict(image_size=32),
      loss=dict(w_feat=0.2, w_ens=5.0, w_bn=0.1, bn_first_weight=5.0))
  mesh = mesh_lib.make_mesh()
  teacher = students.build("resnet34", embed_dim=num_classes, cifar_stem=True,
                           image_size=32)
  dummy = jnp.zeros((1, 32, 32, 3))
  init = jax.jit(lambda k: teacher.init(k, dummy,
                                        mutable=["params", "batch_stats"]))
  teachers = jax.tree.map(lambda *x: jnp.stack(x),
                          *[init(jax.random.key(i, impl="rbg")) for i in range(3)])
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  teachers = nn.unbox(teachers)
  student = multihead.build("resnet18", num_heads=3, num_classes=num_classes)
  gen = generator_lib.build(32)
  state, state_sh = datafree_kd.create_state(config, student, gen, mesh)
  step = datafree_kd.compile_iteration(
      config, datafree_kd.make_steps(config, student, gen, teacher, mesh),
      state_sh, mesh)
  holder = {"state": state}

  def iteration():
    holder["state"], metrics = step(holder["state"], teachers)
    return float(jax.block_until_ready(metrics["generator_loss"]))
  return iteration


def measure(fn, warmup: int, iters: int) -> dict[str, float]:
  t0 = time.perf_counter()
  for _ in range(warmup):
    fn()
  t1 = time.perf_counter()
  for _ in range(iters):
    fn()
  t2 = time.perf_counter()
  return {"first_seconds": t1 - t0, "iters_per_sec": iters / (t2 - t1),
          "seconds_per_iter": (t2 - t1) / iters}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--json", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      "datafree_throughput.json"))
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  results = {
      "jax": measure(jax_iteration_fn(args.batch, args.classes),
                     args.warmup, args.iters),
      "pytorch": measure(torch_iteration_fn(args.batch, args.classes),
                         args.warmup, args.iters),
  }
  print(f"\nbatch {args.batch}, 32 px, 3 x ResNet-34 teachers, ResNet-18 "
        f"3-head student; one iteration = 5 student + 1 generator steps")
  print(f"{'impl':<10}{'iters/s':>10}{'s/iter':>10}{'first (s)':>12}")
  for name, r in results.items():
    print(f"{name:<10}{r['iters_per_sec']:>10.4f}{r['seconds_per_iter']:>10.2f}"
          f"{r['first_seconds']:>12.1f}")
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump({"args": vars(args), "results": results,
               "machine": {"cpus": os.cpu_count(),
                           "platform": platform.platform(),
                           "jax": jax.__version__, "torch": torch.__version__,
                           "load_avg": os.getloadavg()}}, f, indent=2)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
