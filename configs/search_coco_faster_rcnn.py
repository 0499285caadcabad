"""Parameterized AP Loss search for Faster R-CNN R50-FPN on COCO, as published: 82 searched
numbers (the RPN's and the R-CNN's five functions, 8 numbers each, then the two heads'
gradient scales), 40 rounds of 8 sampled losses, each proxy trained one epoch on a
search-train split of train2017 and scored by COCO AP on a held-out 5k-image split of
train2017.

Reproduces fundamentalvision/Parameterized-AP-Loss ``search_configs/cfg_search_faster_rcnn.py``.
The split files are not shipped: give them as COCO folders (``data.train_annotations``,
``data.val_annotations``). Usage: see ``configs/__init__.py`` (with ``python -m jaxrank.search``).
"""

from jaxrank.search import config as search_config
from jaxrank.train import presets


def get_config():
  # fundamentalvision/Parameterized-AP-Loss search_configs/cfg_search_faster_rcnn.py
  c = presets.coco_config("faster_rcnn_pap")  # model, data and augmentation of the PAP recipe
  c.name = "search_coco_faster_rcnn"
  # Start of the search (mu: identity functions, scale 1 in both heads); proxies get the
  # sampled pap_theta. The RPN keeps the inherited RandomSampler (256 anchors per image).
  c.loss.pap_rpn_preset = "identity"
  c.loss.pap_rcnn_preset = "identity"
  c.data.train_images = "data/coco/train2017"
  c.data.train_annotations = "data/coco/annotations/search_train.json"
  c.data.val_images = "data/coco/train2017"
  c.data.val_annotations = "data/coco/annotations/search_val.json"
  c.optimizer.lr = 0.024
  c.optimizer.lr_reference_batch_size = 64  # 8 images x 8 GPUs (the config: 0.012 for 4 x 8)
  c.optimizer.warmup_steps = 500
  c.optimizer.warmup_ratio = 0.001
  c.optimizer.schedule = "constant"  # lr_config step=[]
  c.train.batch_size = 64
  c.train.num_epochs = 1
  c.train.plots = False
  c.search = search_config.search_section()
  c.search.num_rounds = 40  # sample_times
  c.search.num_samples = 8
  c.search.sigma0 = 0.2
  c.search.clip_eps = 0.1
  c.search.learning_rate = 0.01  # mu_lr
  c.search.ppo_steps = 100  # update_per_sample
  c.search.initial = "identity"  # mu_ for each of the 10 functions, 0.5 for both scales
  c.search.target = "coco"
  return c
