"""RetinaNet R50-FPN with Parameterized AP Loss as the only loss (PAP repo: SSD-style 512, batch 64,
SGD lr 0.016, 100 epochs, x0.1 at 60 and 80), with the published searched functions
(loss.pap_preset="retinanet", gradient scale 4.1231 on the box branch).

Published setting: SGD momentum 0.9, weight decay 1e-4, linear warmup over 500 iterations
from 0.001 x lr, ImageNet-pretrained ResNet-50 with frozen BatchNorm and stem + layer1
frozen, one ranking per device ('per_device').

The learning rate follows the linear scaling rule: optimizer.lr is the published rate at
the published global batch (optimizer.lr_reference_batch_size) and the trainer uses
lr * train.batch_size / lr_reference_batch_size.

  python -m jaxrank.train --config configs/coco_retinanet_pap.py \
      --config.data.train_images=/data/coco/train2017 \
      --config.data.train_annotations=/data/coco/annotations/instances_train2017.json \
      --config.data.val_images=/data/coco/val2017 \
      --config.data.val_annotations=/data/coco/annotations/instances_val2017.json \
      --config.model.pretrained=/weights/resnet50.pth

(or --config.data.source=tfds for TensorFlow Datasets' coco/2017.)
"""

from jaxrank.train import presets


def get_config():
  return presets.coco_config("retinanet_pap")
