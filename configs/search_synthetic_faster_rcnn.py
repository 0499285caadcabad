"""Parameterized AP Loss search for Faster R-CNN on the built-in synthetic shapes (2-core CPU).

Proxy: the tiny two-stage detector trained 100 steps of 8 images at 64 px on a 512-image split,
scored by COCO AP on 128 held-out images; 82 searched numbers (see jaxrank.search.space) from
the identity functions in both heads; 8 samples per round over 3 rounds, about 3-4 minutes a
round on an idle 2-core CPU.

  python -m jaxrank.search --config configs/search_synthetic_faster_rcnn.py --workdir runs/s
  python -m jaxrank.train --config runs/s/searched_config.py
"""

from jaxrank.search import config as search_config


def get_config():
  return search_config.faster_rcnn_synthetic_search_config()
