"""Recipe 'pap' (Parameterized AP Loss, the published RetinaNet functions) on the built-in
synthetic shapes with a tiny detector (CPU minutes).

Other functions: --config.loss.pap_preset=identity, or the 41 searched numbers of a search
(python -m jaxrank.search writes a config file with them)."""

from jaxrank.train import presets


def get_config():
  return presets.synthetic_config("pap")
