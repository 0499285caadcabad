"""Recipe 'focal_smooth_l1' on the built-in synthetic shapes with a tiny detector (CPU minutes)."""

from jaxrank.train import presets


def get_config():
  return presets.synthetic_config("focal_smooth_l1")
