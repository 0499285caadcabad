"""Default run of ``python -m jaxrank.train``: a tiny ATSS-style detector trained with the
Rank & Sort loss on the built-in synthetic shapes dataset (3 classes, 96 px images, 2048
training and 256 validation images, 1-6 objects of 12-72 px per image).

Sized for a laptop CPU: 2400 steps of 8 images with AdamW (lr 2e-3, cosine), finishing in
about 3 minutes on 2 idle cores with COCO AP@[.5:.95] about 0.56 on the synthetic validation split
(see jaxrank/train/presets.py). Evaluation keeps the 100 best detections per image
(eval.score_threshold=0): ranking losses leave the scores uncalibrated.
"""

from jaxrank.train import presets


def get_config():
  return presets.synthetic_config("rank_sort", name="default")
