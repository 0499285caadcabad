"""RS-ATSS R50-FPN with Rank & Sort Loss (RS repo: batch 16, SGD lr 0.008, 12 epochs, x0.1 at 8 and 11).

Published setting: SGD momentum 0.9, weight decay 1e-4, linear warmup over 500 iterations
from 0.001 x lr, ImageNet-pretrained ResNet-50 with frozen BatchNorm and stem + layer1
frozen, one ranking per device ('per_device').

The learning rate follows the linear scaling rule: optimizer.lr is the published rate at
the published global batch (optimizer.lr_reference_batch_size) and the trainer uses
lr * train.batch_size / lr_reference_batch_size.

  python -m jaxrank.train --config configs/coco_atss_rs.py \
      --config.data.train_images=/data/coco/train2017 \
      --config.data.train_annotations=/data/coco/annotations/instances_train2017.json \
      --config.data.val_images=/data/coco/val2017 \
      --config.data.val_annotations=/data/coco/annotations/instances_val2017.json \
      --config.model.pretrained=/weights/resnet50.pth

(or --config.data.source=tfds for TensorFlow Datasets' coco/2017.)
"""

from jaxrank.train import presets


def get_config():
  return presets.coco_config("atss_rs")
