"""Parameterized AP Loss search for RetinaNet R50-FPN on COCO, as published (spec 6.4): 40
rounds of 8 sampled losses; each proxy trains one epoch on a search-train split of
train2017 with SGD lr 0.016 at batch 64 (500 warmup iterations, no decay) and is scored by
COCO AP on a held-out 5k-image split of train2017.

Give the two splits as COCO folders (the published split files are not shipped):

  python -m jaxrank.search --config configs/search_coco_retinanet.py --workdir runs/pap_search \
      --config.data.train_images=/data/coco/train2017 \
      --config.data.train_annotations=/data/coco/annotations/search_train.json \
      --config.data.val_images=/data/coco/train2017 \
      --config.data.val_annotations=/data/coco/annotations/search_val.json \
      --config.model.pretrained=/weights/resnet50.pth
"""

from jaxrank.search import config as search_config


def get_config():
  return search_config.coco_search_config()
