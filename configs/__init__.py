"""Config files of ``python -m jaxrank.train`` and ``python -m jaxrank.search``.

Each file has a ``get_config()`` (or ``get_config(arg)``) returning an
``ml_collections.ConfigDict``; it ships with the package as ``jaxrank.configs``, so a config
is found by its name from any directory::

  python -m jaxrank.train --list_configs
  python -m jaxrank.train --config synthetic:alrp --workdir runs/alrp
  python -m jaxrank.train --config coco_atss_rs \\
      --config.data.train_images=/data/coco/train2017 \\
      --config.data.train_annotations=/data/coco/annotations/instances_train2017.json \\
      --config.data.val_images=/data/coco/val2017 \\
      --config.data.val_annotations=/data/coco/annotations/instances_val2017.json \\
      --config.model.pretrained=/weights/resnet50.pth

(or ``--config.data.source=tfds`` for TensorFlow Datasets' coco/2017). A path works too:
``--config configs/coco_atss_rs.py`` or any file of your own.

The COCO configs give the published learning rate at the published global batch
(``optimizer.lr_reference_batch_size``); the trainer uses ``lr * train.batch_size /
lr_reference_batch_size`` (linear scaling rule), so changing ``train.batch_size`` keeps the
recipe.
"""
