"""Recipe 'bucketed_rank_sort' on the built-in synthetic shapes, tiny detector (CPU minutes)."""

from jaxrank.train import presets


def get_config():
  return presets.synthetic_config("bucketed_rank_sort")
