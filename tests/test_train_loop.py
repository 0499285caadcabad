"""The training loop in-process: NaN policies, checkpoint fallback, bad data, evaluation."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrank.data import CorruptImageError
from jaxrank.train import trainer

from test_train_helpers import (  # noqa: F401
  assert_states_equal,
  checkpoint_steps,
  jax_cache,
  load_meta,
  load_state,
  make_coco_folder,
  tiny_config,
)

pytestmark = pytest.mark.usefixtures("jax_cache")


def _nan_on_image(monkeypatch, image_id: int):
  """Makes the loss NaN for every batch holding ``image_id``."""
  from jaxrank.models.dense import recipes

  original = recipes.detection_loss

  def poisoned(static, outputs, batch, loss_config, loss_state):
    loss, aux = original(static, outputs, batch, loss_config, loss_state)
    hit = jnp.any(batch["image_id"] == image_id)
    return jnp.where(hit, jnp.nan, loss), aux

  monkeypatch.setattr(recipes, "detection_loss", poisoned)


def test_nan_loss_step_is_skipped_and_counted(tmp_path, monkeypatch, caplog):
  _nan_on_image(monkeypatch, image_id=5)
  config = tiny_config(train__num_steps=4, train__checkpoint_every=0)
  with caplog.at_level(logging.WARNING, logger="jaxrank"):
    result = trainer.train(config, str(tmp_path))
  # 32 images, batch 8: image 5 is in exactly one of the 4 batches of epoch 0.
  assert result.metrics["skipped_steps"] == 1
  assert "non-finite loss" in caplog.text and "step skipped" in caplog.text
  state = load_state(str(tmp_path), 4)
  assert all(np.all(np.isfinite(v)) for k, v in state.items() if k.startswith("['params']"))
  history = json.load(open(tmp_path / "metrics.json"))
  assert len(history["nan_events"]) == 1 and history["nan_events"][0]["action"] == "skip"
  assert history["final"]["skipped_steps"] == 1


def test_nan_loss_with_stop_policy_keeps_last_checkpoint(tmp_path, monkeypatch):
  # Image 5 is in the 3rd batch of epoch 0 (seed 0): steps 1-2 fine, step 3 NaN.
  from jaxrank.data import epoch_batch_indices

  rows = epoch_batch_indices(32, batch_size=8, shuffle=True, seed=0, epoch=0,
                             drop_remainder=True)
  nan_step = int(np.nonzero((rows + 1 == 5).any(1))[0][0]) + 1
  _nan_on_image(monkeypatch, image_id=5)
  config = tiny_config(train__num_steps=4, train__checkpoint_every=1, train__nan_policy="stop")
  with pytest.raises(trainer.NonFiniteLossError, match=f"at step {nan_step}.*nan_policy='stop'"):
    trainer.train(config, str(tmp_path))
  steps = checkpoint_steps(str(tmp_path))
  assert steps == list(range(1, nan_step))
  if steps:
    state = load_state(str(tmp_path), steps[-1])
    assert all(np.all(np.isfinite(v)) for v in state.values() if v.dtype.kind == "f")


def test_too_many_consecutive_skips_stop_the_run(tmp_path, monkeypatch):
  # 8 training images, batch 8: every batch holds image 5, so every step is NaN (the same
  # compiled program as above: only the dataset size differs).
  _nan_on_image(monkeypatch, image_id=5)
  config = tiny_config(train__num_steps=10, train__max_consecutive_nan_skips=3,
                       train__checkpoint_every=0, data__num_train=8)
  with pytest.raises(trainer.NonFiniteLossError, match="3 consecutive steps"):
    trainer.train(config, str(tmp_path))


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, caplog):
  workdir = str(tmp_path)
  trainer.train(tiny_config(train__num_steps=4, train__checkpoint_every=2), workdir)
  assert checkpoint_steps(workdir) == [2, 4]
  # Damage every file of the latest step.
  for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with caplog.at_level(logging.WARNING, logger="jaxrank"):
    result = trainer.train(tiny_config(train__num_steps=6, train__checkpoint_every=2), workdir)
  assert "checkpoint step 4" in caplog.text and "unreadable" in caplog.text
  assert "falling back to step 2" in caplog.text
  assert result.metrics["resumed_from"] == 2 and result.step == 6
  assert checkpoint_steps(workdir) == [2, 4, 6]  # 4 re-saved from the resumed run
  assert os.listdir(tmp_path / "checkpoints" / "corrupt")
  # A fresh resume reads the new step 6.
  result = trainer.train(tiny_config(train__num_steps=6), workdir)
  assert result.metrics["resumed_from"] == 6 and result.metrics["steps_this_run"] == 0
  # A partial step (its state item missing) is skipped too.
  import shutil

  shutil.rmtree(tmp_path / "checkpoints" / "6" / "state")
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxrank"):
    result = trainer.train(tiny_config(train__num_steps=6), workdir)
  assert "checkpoint step 6" in caplog.text and "falling back to step 4" in caplog.text
  assert result.metrics["resumed_from"] == 4 and result.step == 6


def test_resume_continues_the_uninterrupted_run(tmp_path):
  """In-process resume: 2 steps, then 2 more, equals 4 steps straight."""
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  trainer.train(tiny_config(train__num_steps=4, train__checkpoint_every=2), a)
  trainer.train(tiny_config(train__num_steps=2, train__checkpoint_every=2), b)
  result = trainer.train(tiny_config(train__num_steps=4, train__checkpoint_every=2), b)
  assert result.metrics["resumed_from"] == 2
  assert load_meta(b, 4)["epoch"] == 1 and load_meta(b, 4)["batch_in_epoch"] == 0
  assert_states_equal(load_state(a, 4), load_state(b, 4), prefix="[")


def test_missing_dataset_path(tmp_path):
  config = tiny_config(data__source="coco_folder",
                       data__train_images=str(tmp_path / "nope"),
                       data__train_annotations=str(tmp_path / "nope.json"),
                       data__val_images=str(tmp_path / "nope"),
                       data__val_annotations=str(tmp_path / "nope.json"))
  with pytest.raises(FileNotFoundError, match="data.train_images: image folder not found"):
    trainer.train(config, str(tmp_path / "run"))


def test_missing_dataset_path_cli_message(tmp_path, capsys):
  from jaxrank.train.__main__ import main

  code = main(["--config.data.source=coco_folder",
               f"--config.data.train_images={tmp_path}",
               f"--config.data.train_annotations={tmp_path}/missing.json",
               f"--config.data.val_images={tmp_path}",
               f"--config.data.val_annotations={tmp_path}/missing.json",
               "--workdir", str(tmp_path / "run"), "--no_progress"])
  assert code == 1
  err = capsys.readouterr().err
  assert "data.train_annotations: annotation file not found" in err and "missing.json" in err


def _coco_config(img_dir, ann, **updates):
  return tiny_config(data__source="coco_folder", data__train_images=img_dir,
                     data__train_annotations=ann, data__val_images=img_dir,
                     data__val_annotations=ann, train__batch_size=4, eval__batch_size=4,
                     **updates)


def test_bad_boxes_and_images_without_annotations_train_fine(tmp_path, caplog):
  img_dir, ann = make_coco_folder(str(tmp_path / "coco"), num_images=12, bad_boxes=True,
                                  empty_images=3)
  with caplog.at_level(logging.WARNING):
    result = trainer.train(_coco_config(img_dir, ann, train__num_steps=3), str(tmp_path / "run"))
  assert "dropped" in caplog.text and "zero area" in caplog.text
  assert "negative size" in caplog.text and "outside image" in caplog.text
  assert result.step == 3 and np.isfinite(result.metrics["AP"])
  history = json.load(open(tmp_path / "run" / "metrics.json"))
  assert all(np.isfinite(e["loss"]) for e in history["train"])


def test_corrupt_image_raises_naming_the_file(tmp_path):
  img_dir, ann = make_coco_folder(str(tmp_path / "coco"), num_images=8, corrupt=1,
                                  bad_boxes=False, empty_images=0)
  # 9 images, batch 4: the corrupt one is read in the first two epochs, by a loader process.
  config = _coco_config(img_dir, ann, train__num_steps=4, data__num_workers=2)
  with pytest.raises(CorruptImageError, match="corrupt_0.jpg"):
    trainer.train(config, str(tmp_path / "run"))
  deadline = time.time() + 10
  while any(p.name.startswith("grain") for p in multiprocessing.active_children()):
    assert time.time() < deadline, "loader processes outlived the failed run"
    time.sleep(0.1)


def test_corrupt_image_skipped_with_on_corrupt_skip(tmp_path, caplog):
  img_dir, ann = make_coco_folder(str(tmp_path / "coco"), num_images=8, corrupt=1,
                                  bad_boxes=False, empty_images=0)
  config = _coco_config(img_dir, ann, train__num_steps=2, data__on_corrupt="skip")
  with caplog.at_level(logging.WARNING):
    result = trainer.train(config, str(tmp_path / "run"))
  assert "corrupt_0.jpg" in caplog.text
  assert result.step == 2


def test_wrong_number_of_classes_is_a_config_error(tmp_path):
  from jaxrank.train.config import ConfigError

  img_dir, ann = make_coco_folder(str(tmp_path / "coco"), num_images=8)
  with pytest.raises(ConfigError, match="has 3 classes.*set data.num_classes=3"):
    trainer.train(_coco_config(img_dir, ann, data__num_classes=5), str(tmp_path / "run"))


def test_evaluate_checkpoint_writes_coco_results(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train(tiny_config(train__num_steps=2, train__checkpoint_every=1), workdir)
  from jaxrank.eval import main

  assert main(["--workdir", workdir, "--checkpoint", "1", "--no_progress"]) == 0
  out = tmp_path / "run" / "eval" / "step_1"
  dets = json.load(open(out / "detections.json"))
  assert isinstance(dets, list)
  for d in dets[:5]:
    assert set(d) == {"image_id", "category_id", "bbox", "score"} and len(d["bbox"]) == 4
  metrics = json.load(open(out / "metrics.json"))
  for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_class_AP"):
    assert key in metrics
  assert metrics["step"] == 1 and set(metrics["per_class_AP"]) == {"square", "disc", "triangle"}
  assert (out / "pr_curve.png").exists()
  assert main(["--workdir", workdir, "--checkpoint", "7", "--no_progress"]) == 1
