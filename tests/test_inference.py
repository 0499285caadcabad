"""Inference on a trained run: load_detector, predictions in original pixels, the params-only
export and the predict / export command lines."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxrank
from jaxrank import export as export_cli
from jaxrank import predict as predict_cli
from jaxrank.data import make_synthetic_dataset, prepare_image_for_inference

from test_train_helpers import REPO, compilation_cache, tiny_config


def _json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _folder_size(path) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny run with checkpoints at steps 2 and 4 (trained once for the module)."""
  from jaxrank.train import trainer

  workdir = str(tmp_path_factory.mktemp("inference_run"))
  with compilation_cache():
    trainer.train(tiny_config(train__num_steps=4, train__checkpoint_every=2), workdir)
  return workdir


@pytest.fixture(scope="module")
def loaded(run_dir):
  return jaxrank.load_detector(run_dir)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
  """A synthetic shapes image cropped to ``height x width`` (non-square)."""
  side = max(height, width)
  record = make_synthetic_dataset(1, image_size=side, num_classes=3, max_objects=3,
                                  min_size=side // 5, seed=seed).records[0]
  return np.ascontiguousarray(record.source[:height, :width])


def test_load_run_predicts_in_original_pixels(loaded, run_dir):
  assert loaded.step == 4 and loaded.image_size == 64
  assert loaded.class_names == tuple(_json(os.path.join(run_dir, "class_names.json")))
  image = _image(90, 150)
  out = loaded.predict(image, score_threshold=0.0)
  n = len(out["scores"])
  assert n > 0 and out["boxes"].shape == (n, 4) and out["classes"].shape == (n,)
  assert out["boxes"].dtype == np.float32 and out["classes"].dtype == np.int32
  assert len(out["class_names"]) == n
  assert [loaded.class_names[c] for c in out["classes"]] == out["class_names"]
  boxes = out["boxes"]
  assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= 150) and np.all(boxes[:, [1, 3]] <= 90)
  assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
  assert np.all(np.diff(out["scores"]) <= 0)
  # The same detections as the module on the S x S frame, divided by the scale.
  prepared, scale = prepare_image_for_inference(image, 64)
  det = loaded.detector.detect(prepared[None], score_threshold=0.0, max_detections=100,
                               iou_threshold=0.5, pre_nms_top_k=1000)
  valid = np.asarray(det.valid[0])
  expected = np.clip(np.asarray(det.boxes[0])[valid] / scale, 0, [150, 90, 150, 90])
  scores = np.asarray(det.scores[0])[valid]
  nonempty = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
  order = np.argsort(-scores[nonempty], kind="stable")
  np.testing.assert_allclose(boxes, expected[nonempty][order], rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(out["scores"], scores[nonempty][order], rtol=1e-5, atol=1e-6)
  # Defaults from the run's eval section; grayscale input is accepted.
  assert loaded.post_options() == {k: loaded.config.eval[k] for k in
                                   ("score_threshold", "max_detections", "iou_threshold",
                                    "pre_nms_top_k")}
  gray = loaded.predict(image[:, :, 0], score_threshold=0.0)
  assert gray["boxes"].shape[1] == 4
  with pytest.raises(ValueError, match="iou_threshold"):
    loaded.predict(image, iou_threshold=2.0)
  with pytest.raises(ValueError, match="uint8"):
    loaded.predict(image.astype(np.float32))


def test_load_step_and_latest_readable_fallback(run_dir, tmp_path, caplog):
  image = _image(70, 50, seed=3)
  at2 = jaxrank.load_detector(run_dir, step=2)
  assert at2.step == 2
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  for root, _, files in os.walk(copy / "checkpoints" / "4" / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with caplog.at_level(logging.WARNING, logger="jaxrank"):
    fallback = jaxrank.load_detector(str(copy))
  assert fallback.step == 2 and "checkpoint step 4" in caplog.text
  assert sorted(os.listdir(copy / "checkpoints")) == ["2", "4"]  # the run is not changed
  a, b = at2.predict(image, score_threshold=0.0), fallback.predict(image, score_threshold=0.0)
  np.testing.assert_array_equal(a["boxes"], b["boxes"])
  with pytest.raises(ValueError, match="step 4"):
    jaxrank.load_detector(str(copy), step=4)


def test_export_gives_identical_detections(loaded, run_dir, tmp_path):
  out = jaxrank.export_detector(run_dir, str(tmp_path / "export"))
  assert sorted(os.listdir(out)) == ["class_names.json", "config.json", "export.json",
                                     "weights.npz"]
  with np.load(os.path.join(out, "weights.npz")) as weights:
    keys = list(weights.files)
  assert keys and all(k.startswith(("['params']", "['rest']")) for k in keys)
  assert _folder_size(out) < _folder_size(os.path.join(run_dir, "checkpoints", "4"))
  meta = _json(os.path.join(out, "export.json"))
  assert meta["step"] == 4 and meta["format"] == "jaxrank-detector"
  exported = jaxrank.load_detector(out)
  assert exported.step == 4 and exported.class_names == loaded.class_names
  image = _image(90, 150, seed=1)
  a, b = loaded.predict(image, score_threshold=0.0), exported.predict(image, score_threshold=0.0)
  for k in ("boxes", "scores", "classes"):
    np.testing.assert_array_equal(a[k], b[k])
  assert a["class_names"] == b["class_names"]
  with pytest.raises(ValueError, match="step 2"):
    jaxrank.load_detector(out, step=2)
  # The command line writes the same export.
  assert export_cli.main(["--workdir", run_dir, "--out", str(tmp_path / "cli"), "--step", "2"]) == 0
  assert _json(tmp_path / "cli" / "export.json")["step"] == 2
  assert export_cli.main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 1
  assert export_cli.main(["--workdir", run_dir]) == 2


def test_predict_cli_writes_images_and_coco_results(run_dir, tmp_path, capsys):
  from PIL import Image

  folder = tmp_path / "images"
  folder.mkdir()
  Image.fromarray(_image(90, 150)).save(folder / "wide.png")
  Image.fromarray(_image(120, 60, seed=2)).save(folder / "tall.jpg")
  (folder / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  code = predict_cli.main(["--workdir", run_dir, str(folder), "--out", str(out),
                           "--score_threshold", "0", "--max_drawn", "5"])
  assert code == 0, capsys.readouterr().err
  assert sorted(os.listdir(out)) == ["detections.json", "tall.png", "wide.png"]
  with Image.open(out / "wide.png") as drawn:
    assert drawn.size == (150, 90)
  results = _json(out / "detections.json")
  assert results and {r["image_id"] for r in results} == {1, 2}
  for r in results:
    size = (60, 120) if r["file_name"].endswith("tall.jpg") else (150, 90)
    x, y, w, h = r["bbox"]
    assert 1 <= r["category_id"] <= 3 and w > 0 and h > 0
    assert x >= 0 and y >= 0 and x + w <= size[0] + 0.01 and y + h <= size[1] + 0.01
  # Default output folder: RUN/predictions.
  assert predict_cli.main(["--workdir", run_dir, str(folder / "wide.png")]) == 0
  assert os.path.isfile(os.path.join(run_dir, "predictions", "detections.json"))


def test_predict_cli_bad_input_and_arguments(run_dir, tmp_path, capsys):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  good = tmp_path / "good.png"
  from PIL import Image

  Image.fromarray(_image(40, 50)).save(good)
  out = tmp_path / "out"
  assert predict_cli.main(["--workdir", run_dir, str(good), str(bad), "--out", str(out)]) == 1
  assert "broken.jpg" in capsys.readouterr().err
  assert os.path.isfile(out / "good.png")  # the readable image is still written
  assert predict_cli.main(["--workdir", run_dir, str(tmp_path / "missing.png")]) == 1
  assert "missing.png" in capsys.readouterr().err
  assert predict_cli.main(["--workdir", str(tmp_path), str(good)]) == 1
  assert "neither a training run folder" in capsys.readouterr().err
  assert predict_cli.main(["--workdir", run_dir, str(good), "--step", "7"]) == 1
  assert "step 7" in capsys.readouterr().err
  assert predict_cli.main(["--workdir", run_dir, str(good), "--iou_threshold", "3"]) == 2
  assert predict_cli.main(["--workdir", run_dir]) == 2
  assert predict_cli.main([str(good)]) == 2


def test_load_detector_errors_name_the_path(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    jaxrank.load_detector(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="neither a training run folder"):
    jaxrank.load_detector(tmp_path)
  empty = tmp_path / "empty_run"
  (empty / "checkpoints").mkdir(parents=True)
  shutil.copy(os.path.join(run_dir, "config.json"), empty / "config.json")
  with pytest.raises(FileNotFoundError, match="no checkpoints in .*empty_run"):
    jaxrank.load_detector(empty)
  with pytest.raises(FileNotFoundError, match="step 9"):
    jaxrank.load_detector(run_dir, step=9)


def test_importing_losses_does_not_import_flax():
  code = "import sys, jaxrank.losses; print('flax' in sys.modules, 'optax' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["False", "False"]
