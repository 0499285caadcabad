"""Parameterized AP Loss search on the built-in synthetic shapes, sized for a 2-core CPU.

Proxy: the tiny RetinaNet (P3-P5, 32-channel FPN and head) trained for 250 steps of 8
images at 64 px on a 512-image search-train split, scored by COCO AP on a held-out
128-image split. 8 samples per round, sigma decaying over 6 rounds; the rest as published.

  python -m jaxrank.search --config configs/search_synthetic.py --workdir runs/search
  python -m jaxrank.train --config runs/search/searched_config.py
"""

from jaxrank.search import config as search_config


def get_config():
  return search_config.synthetic_search_config()
