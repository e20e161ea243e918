"""Alias of configs/edgevl.py:dataset=sun_rgbd (kept for one release)."""
import os
import runpy

_EDGEVL = runpy.run_path(os.path.join(os.path.dirname(__file__), "edgevl.py"))


def get_config(arg=None):
  return _EDGEVL["get_config"](",".join(filter(None, (
      "dataset=sun_rgbd", arg))))
