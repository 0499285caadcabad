"""Parameterized AP Loss search for Faster R-CNN on the built-in synthetic shapes, sized for a
2-core CPU.

Proxy: the tiny two-stage detector (P2-P6, 32-channel FPN and RPN, 128-wide box head, 64
proposals per image) trained for 100 steps of 8 images at 64 px on a 512-image search-train
split, scored by COCO AP on a held-out 128-image split. 82 searched numbers (the RPN's and
the R-CNN's five functions, then their two gradient scales, see jaxrank.search.space),
starting from the identity functions in both heads; the RPN keeps the recipe's random sampler
(256 anchors per image). 8 samples per round, sigma decaying over 3 rounds; the rest as
published. About 3-4 minutes per round on an idle 2-core CPU (proxies one after another),
plus about a minute of compilation.

  python -m jaxrank.search --config configs/search_synthetic_faster_rcnn.py --workdir runs/s
  python -m jaxrank.train --config runs/s/searched_config.py
"""

from jaxrank.search import config as search_config


def get_config():
  return search_config.faster_rcnn_synthetic_search_config()
