r"""Runs every benchmark in benchmarks/ and summarises their headline numbers.

  python benchmarks/run_all.py            # quick settings (minutes on a CPU)
  python benchmarks/run_all.py --full     # each benchmark's real settings
  python benchmarks/run_all.py --only=stage1_throughput,sharding_memory

Each benchmark runs as a subprocess writing benchmarks/results/<name>.json;
then one line per benchmark (status, seconds, headline numbers) is printed
and benchmarks/results/summary.json is written. A failing benchmark is
reported with the tail of its stderr and does not stop the others.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# name -> (quick flags, full flags). `--json` is added by the runner.
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "sharding_memory": ([], []),
    "student_latency": (
        ["--quick", "--students=vit_ti16,resnet18", "--batches=1,8"], []),
    "edge_latency": (
        ["--quick", "--students=resnet18", "--batches=1", "--threads=1"], []),
    "teacher_throughput": (
        ["--batch=2", "--image-size=64", "--layers=2", "--warmup=1",
         "--iters=2"], []),
    "stage1_throughput": (
        ["--quick"], ["--teacher=vit_b16", "--student=swin_t", "--batch=8"]),
    "stage1_memory": (["--batch=4", "--image_size=64", "--rows=0,4"], []),
    "datafree_throughput": (["--batch=8", "--classes=10", "--iters=1"], []),
    "input_pipeline": (
        ["--image_size=64", "--batch_size=8", "--num_batches=2",
         "--render_examples=48", "--render_sizes=32", "--prepare_train=120"],
        []),
    "cka_scaling": (["--quick"], []),
}

# Substrings of flattened keys that make a headline number.
_HEADLINE = ("per_s", "ratio", "mfu", "speedup", "over_torch", "latency_ms",
             "predicted_gb", "bytes_per_device", "peak_gb")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
  elif isinstance(d, (int, float)) and not isinstance(d, bool):
    out[prefix[:-1]] = d
  return out


def headline(result: Any, limit: int = 5) -> dict[str, float]:
  """Up to `limit` numbers of a result JSON whose keys look like headlines."""
  flat = _flatten(result)
  picked = {k: v for k, v in flat.items()
            if any(h in k for h in _HEADLINE) and "args." not in k}
  return dict(list(picked.items())[:limit])


def run_one(name: str, flags: list[str], timeout: float) -> dict[str, Any]:
  """Runs benchmarks/<name>.py; returns its summary entry."""
  out_json = os.path.join(RESULTS, f"{name}.json")
  if os.path.exists(out_json):
    os.remove(out_json)
  cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), *flags,
         f"--json={out_json}"]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ,
                                                "PYTHONPATH": ROOT})
  except subprocess.TimeoutExpired:
    return {"name": name, "status": f"timeout after {timeout:.0f} s",
            "seconds": time.perf_counter() - t0, "command": cmd}
  entry = {"name": name, "seconds": time.perf_counter() - t0, "command": cmd}
  if proc.returncode != 0 or not os.path.exists(out_json):
    entry["status"] = f"failed (exit {proc.returncode})"
    entry["stderr_tail"] = proc.stderr[-1500:]
    return entry
  with open(out_json) as f:
    entry["headline"] = headline(json.load(f))
  entry["status"] = "ok"
  entry["json"] = out_json
  return entry


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--full", action="store_true",
                 help="each benchmark's real (slow) settings")
  p.add_argument("--only", default="",
                 help="comma-separated benchmark names (default: all)")
  p.add_argument("--timeout", type=float, default=3600.0,
                 help="seconds per benchmark")
  p.add_argument("--json", default=os.path.join(RESULTS, "summary.json"))
  a = p.parse_args()
  names = [n for n in a.only.split(",") if n] or list(BENCHMARKS)
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
  present = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py")}
  missing = sorted(present - set(BENCHMARKS) - {"run_all"})
  if missing:
    print(f"note: benchmarks without run_all settings, run with defaults: "
          f"{missing}")
  os.makedirs(RESULTS, exist_ok=True)
  entries = []
  for name in names + missing:
    quick, full = BENCHMARKS.get(name, ([], []))
    print(f"running {name} ...", flush=True)
    entries.append(run_one(name, full if a.full else quick, a.timeout))
  print(f"\n{'benchmark':<22}{'status':<18}{'s':>7}  headline")
  for e in entries:
    nums = ", ".join(f"{k}={v:.4g}" for k, v in e.get("headline", {}).items())
    print(f"{e['name']:<22}{e['status']:<18}{e['seconds']:>7.0f}  {nums}")
    if "stderr_tail" in e:
      print("    " + e["stderr_tail"].strip().splitlines()[-1][:200])
  with open(a.json, "w") as f:
    json.dump({"mode": "full" if a.full else "quick", "benchmarks": entries},
              f, indent=2)
  return 0 if all(e["status"] == "ok" for e in entries) else 1


if __name__ == "__main__":
  sys.exit(main())
