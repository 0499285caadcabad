"""Tests of the COCO folder loader."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from jaxrank.data import (
  CorruptImageError,
  SourceImage,
  iterate_batches,
  load_coco_folder,
  load_tfds_coco,
)


def _annotations():
  return {
    "info": {"description": "tiny"},
    "images": [
      {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
      {"id": 11, "file_name": "b.png", "width": 20, "height": 24},
      {"id": 12, "file_name": "c.png", "width": 16, "height": 16},
    ],
    "categories": [{"id": 5, "name": "dog"}, {"id": 1, "name": "cat"}],
    "annotations": [
      {"id": 1, "image_id": 10, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
      {"id": 2, "image_id": 10, "category_id": 5, "bbox": [30, 20, 20, 20], "iscrowd": 0},
      {"id": 3, "image_id": 10, "category_id": 5, "bbox": [5, 5, 0, 4], "iscrowd": 0},
      {"id": 4, "image_id": 11, "category_id": 1, "bbox": [4, 4, -3, 5], "iscrowd": 0},
      {"id": 5, "image_id": 11, "category_id": 1, "bbox": [25, 2, 5, 5], "iscrowd": 0},
      {"id": 6, "image_id": 11, "category_id": 5, "bbox": [1, 1, 6, 6], "iscrowd": 1},
      {"id": 7, "image_id": 11, "category_id": 5, "bbox": [8, 10, 6, 9]},
    ],
  }


@pytest.fixture
def coco_dir(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for im in _annotations()["images"]:
    pixels = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / im["file_name"])
  ann = tmp_path / "instances.json"
  ann.write_text(json.dumps(_annotations()))
  return images, ann


def test_loads_and_maps_categories(coco_dir, caplog):
  images, ann = coco_dir
  with caplog.at_level(logging.WARNING):
    ds = load_coco_folder(images, ann)
  assert len(ds) == 3
  assert ds.class_names == ("cat", "dog")
  assert ds.label_to_category_id == {0: 1, 1: 5}
  ex = ds.load(0)
  assert ex["image"].shape == (30, 40, 3) and ex["image"].dtype == np.uint8
  assert ex["image_id"] == 10
  np.testing.assert_allclose(ex["boxes"], [[2, 3, 12, 11], [30, 20, 40, 30]])
  np.testing.assert_array_equal(ex["labels"], [0, 1])
  assert ex["boxes"].dtype == np.float32 and ex["labels"].dtype == np.int32
  text = caplog.text
  assert "dropped 3 invalid boxes" in text
  assert "negative size" in text and "zero area" in text and "outside image" in text
  assert "clipped 1 boxes" in text


def test_crowd_and_empty_images(coco_dir):
  images, ann = coco_dir
  ds = load_coco_folder(images, ann)
  ex = ds.load(1)
  np.testing.assert_allclose(ex["boxes"], [[8, 10, 14, 19]])
  np.testing.assert_array_equal(ex["labels"], [1])
  empty = ds.load(2)
  assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
  assert empty["image"].shape == (16, 16, 3)
  gt = {a["id"]: a for a in ds.coco["annotations"]}
  assert sorted(gt) == [1, 2, 6, 7]
  assert gt[6]["iscrowd"] == 1 and gt[7]["iscrowd"] == 0
  assert gt[2]["bbox"] == [30.0, 20.0, 10.0, 10.0]
  assert gt[7]["area"] == 54.0
  with_crowd = load_coco_folder(images, ann, skip_crowd=False)
  assert len(with_crowd.load(1)["boxes"]) == 2


def test_missing_paths(coco_dir, tmp_path):
  images, ann = coco_dir
  with pytest.raises(FileNotFoundError, match="nope"):
    load_coco_folder(tmp_path / "nope", ann)
  with pytest.raises(FileNotFoundError, match="missing.json"):
    load_coco_folder(images, tmp_path / "missing.json")
  (images / "c.png").unlink()
  ds = load_coco_folder(images, ann)
  with pytest.raises(FileNotFoundError, match="c.png"):
    ds.load(2)


def test_malformed_json(coco_dir):
  images, ann = coco_dir
  ann.write_text('{"images": [')
  with pytest.raises(ValueError, match="malformed JSON"):
    load_coco_folder(images, ann)
  ann.write_text("[]")
  with pytest.raises(ValueError, match="not an object"):
    load_coco_folder(images, ann)


@pytest.mark.parametrize(
  "edit, key",
  [
    (lambda d: d.pop("categories"), "categories"),
    (lambda d: d["annotations"][3].pop("bbox"), "bbox"),
    (lambda d: d["images"][1].pop("file_name"), "file_name"),
    (lambda d: d["categories"][0].pop("name"), "name"),
  ],
)
def test_missing_keys(coco_dir, edit, key):
  images, ann = coco_dir
  data = _annotations()
  edit(data)
  ann.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=f"'{key}'"):
    load_coco_folder(images, ann)


def test_unknown_references(coco_dir):
  images, ann = coco_dir
  data = _annotations()
  data["annotations"][0]["category_id"] = 99
  ann.write_text(json.dumps(data))
  with pytest.raises(ValueError, match="unknown category 99"):
    load_coco_folder(images, ann)
  data = _annotations()
  data["annotations"][0]["image_id"] = 77
  ann.write_text(json.dumps(data))
  with pytest.raises(ValueError, match="unknown image 77"):
    load_coco_folder(images, ann)


def test_corrupt_image(coco_dir, caplog):
  images, ann = coco_dir
  (images / "b.png").write_bytes(b"\x89PNG not really an image")
  ds = load_coco_folder(images, ann)
  assert ds.load(0)["image"].shape == (30, 40, 3)
  with pytest.raises(CorruptImageError, match="b.png"):
    ds.load(1)
  with caplog.at_level(logging.WARNING):
    skipped = load_coco_folder(images, ann, on_corrupt="skip")
  assert "b.png" in caplog.text
  assert [r.image_id for r in skipped.records] == [10, 12]
  assert {im["id"] for im in skipped.coco["images"]} == {10, 12}
  assert all(a["image_id"] != 11 for a in skipped.coco["annotations"])
  with pytest.raises(ValueError, match="on_corrupt"):
    load_coco_folder(images, ann, on_corrupt="ignore")


def test_image_size_mismatch(coco_dir, caplog):
  images, ann = coco_dir
  rng = np.random.default_rng(1)
  # a.png saved rotated (30 wide, 40 tall); c.png 18x16 instead of the JSON's 16x16.
  Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(images / "a.png")
  Image.fromarray(rng.integers(0, 256, (16, 18, 3), dtype=np.uint8)).save(images / "c.png")
  ds = load_coco_folder(images, ann)
  with pytest.raises(ValueError, match=r"a\.png.*40x30 \(width x height\).*is 30x40.*rotated"):
    ds.load(0)
  assert ds.load(1)["image"].shape == (24, 20, 3)
  with pytest.raises(ValueError, match=r"c\.png.*16x16.*is 18x16"):
    ds.load(2)
  with caplog.at_level(logging.WARNING):
    skipped = load_coco_folder(images, ann, on_corrupt="skip")
  assert [r.image_id for r in skipped.records] == [11]
  assert "a.png" in caplog.text and "40x30" in caplog.text and "30x40" in caplog.text
  assert "c.png" in caplog.text and "18x16" in caplog.text


@pytest.mark.parametrize(
  "edit, where",
  [
    (lambda d: d["images"][1].update(id="abc"), r"images\[1\] has a non-integer 'id': 'abc'"),
    (lambda d: d["images"][0].update(id=True), r"images\[0\] has a non-integer 'id': True"),
    (lambda d: d["images"][2].update(id=12.5), r"images\[2\] has a non-integer 'id': 12.5"),
    (lambda d: d["annotations"][4].update(image_id="11"),
     r"annotations\[4\] has a non-integer 'image_id': '11'"),
    (lambda d: d["annotations"][0].update(category_id=None),
     r"annotations\[0\] has a non-integer 'category_id': None"),
    (lambda d: d["categories"][1].update(id="cat"),
     r"categories\[1\] has a non-integer 'id': 'cat'"),
    (lambda d: d["images"][0].update(width="40"), r"image 10 has an invalid size '40' x 30"),
    (lambda d: d["images"][0].update(height=30.5), r"image 10 has an invalid size 40 x 30.5"),
  ],
)
def test_non_integer_ids_and_sizes(coco_dir, edit, where):
  images, ann = coco_dir
  data = _annotations()
  edit(data)
  ann.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=where):
    load_coco_folder(images, ann)


def test_integral_float_ids_are_normalised(coco_dir):
  images, ann = coco_dir
  data = _annotations()
  data["images"][0].update(id=10.0, width=40.0)
  data["annotations"][0].update(image_id=10.0, category_id=1.0)
  ann.write_text(json.dumps(data))
  ds = load_coco_folder(images, ann)
  assert ds.records[0].image_id == 10 and ds.load(0)["image"].shape == (30, 40, 3)
  im = ds.coco["images"][0]
  assert type(im["id"]) is int and type(im["width"]) is int
  a = next(a for a in ds.coco["annotations"] if a["id"] == 1)
  assert type(a["image_id"]) is int and type(a["category_id"]) is int


def test_tfds_import_error_names_extra():
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match=r"\[coco\]"):
      load_tfds_coco("validation")
  else:
    pytest.skip("tensorflow_datasets is installed")


@pytest.mark.parametrize("random_access", [False, True])
def test_tfds_coco_with_mock_data(random_access):
  """The TFDS path on ``tfds.testing.mock_data`` with known examples (needs the [coco] extra
  and TensorFlow; skipped without them): boxes from normalised yxyx to pixels, labels,
  official category ids, crowd boxes kept for evaluation only, empty boxes dropped; from
  TFRecord files (images kept in memory) or from a random-access data source (images read
  from it on load, also in loader processes)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  tf = pytest.importorskip("tensorflow")
  import io

  def jpeg(w, h):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()

  examples = [
      {"image": jpeg(40, 30), "image/id": 7,
       "objects": {"bbox": np.array([[0.1, 0.25, 0.5, 0.75], [0.0, 0.0, 1.0, 1.0],
                                     [0.2, 0.2, 0.2, 0.3]], np.float32),
                   "label": np.array([0, 79, 3], np.int64),
                   "is_crowd": np.array([False, True, False]),
                   "area": np.array([120.0, 1200.0, 0.0], np.float32)}},
      {"image": jpeg(20, 50), "image/id": 9,
       "objects": {"bbox": np.zeros((0, 4), np.float32), "label": np.zeros((0,), np.int64),
                   "is_crowd": np.zeros((0,), bool), "area": np.zeros((0,), np.float32)}},
  ]
  signature = {"image": tf.TensorSpec((), tf.string), "image/id": tf.TensorSpec((), tf.int64),
               "objects": {"bbox": tf.TensorSpec((None, 4), tf.float32),
                           "label": tf.TensorSpec((None,), tf.int64),
                           "is_crowd": tf.TensorSpec((None,), tf.bool),
                           "area": tf.TensorSpec((None,), tf.float32)}}

  def as_dataset(self, *args, **kwargs):
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)

  def no_data_source(self, *args, **kwargs):
    raise NotImplementedError("Random access data source for file format tfrecord is not "
                              "supported.")

  def data_source(self, *args, **kwargs):
    return examples

  with tfds.testing.mock_data(as_dataset_fn=as_dataset, as_data_source_fn=(
      data_source if random_access else no_data_source)):
    dataset = load_tfds_coco("validation")
  sources = [type(r.source) for r in dataset.records]
  assert sources == [SourceImage if random_access else bytes] * 2
  assert len(dataset) == 2 and dataset.num_classes == 80
  assert len(dataset.coco["categories"]) == 80
  first = dataset.load(0)
  assert first["image"].shape == (30, 40, 3) and first["image_id"] == 7
  # crowd and empty dropped
  np.testing.assert_allclose(first["boxes"], [[10, 3, 30, 15]], atol=1e-4)
  np.testing.assert_array_equal(first["labels"], [0])
  anns = [a for a in dataset.coco["annotations"] if a["image_id"] == 7]
  assert sorted(a["category_id"] for a in anns) == [1, 90]  # crowd kept for evaluation
  assert [a["iscrowd"] for a in sorted(anns, key=lambda a: a["category_id"])] == [0, 1]
  second = dataset.load(1)
  assert second["image"].shape == (50, 20, 3) and second["boxes"].shape == (0, 4)
  if random_access:  # the dataset pickles with its source; loader processes read from it
    kw = dict(batch_size=2, image_size=32, max_boxes=4, augment="flip", seed=3)
    with iterate_batches(dataset, num_workers=1, **kw) as it:
      in_process, = list(iterate_batches(dataset, **kw))
      from_process, = list(it)
    for key in in_process:
      np.testing.assert_array_equal(from_process[key], in_process[key])



def _tiny_coco_builder(tfds):
  """A TFDS builder with coco/2017's features and 3 examples (not registered by name: read
  back from its files)."""
  with tfds.core.registered.skip_registration():
    class JaxrankTinyCoco(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "image/id": np.int64,
          "objects": tfds.features.Sequence({
            "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.ClassLabel(names=[f"class{i}" for i in range(80)]),
            "is_crowd": np.bool_,
            "area": np.int64,
          }),
        }))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i in range(3):
          yield i, {"image": np.full((30 + i, 40, 3), 40 * i, np.uint8), "image/id": 10 + i,
                    "objects": {"bbox": np.array([[0.1, 0.2, 0.6, 0.9]], np.float32),
                                "label": [i], "is_crowd": [False], "area": [100]}}
  return JaxrankTinyCoco


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_files_random_access_or_in_memory(file_format, tmp_path, caplog):
  """Real TFDS files (needs the [coco] extra): ArrayRecord is read through TFDS's data source
  (also from a loader process, which gets the pickled source), TFRecord falls back to the
  encoded images in memory with a warning; both give the same examples."""
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tensorflow")
  _tiny_coco_builder(tfds)(data_dir=str(tmp_path), file_format=file_format).download_and_prepare()
  with caplog.at_level(logging.WARNING, logger="jaxrank.data.coco"):
    dataset = load_tfds_coco("train", data_dir=str(tmp_path), name="jaxrank_tiny_coco")
  random_access = file_format == "array_record"
  assert ("array_record" in caplog.text) != random_access
  assert [type(r.source) for r in dataset.records] == [
    SourceImage if random_access else bytes] * 3
  by_id = {dataset.load(i)["image_id"]: dataset.load(i) for i in range(3)}
  assert sorted(by_id) == [10, 11, 12]
  assert by_id[11]["image"].shape == (31, 40, 3)
  np.testing.assert_allclose(by_id[11]["boxes"], [[8.0, 3.1, 36.0, 18.6]], atol=1e-4)
  np.testing.assert_array_equal(by_id[12]["labels"], [2])
  kw = dict(batch_size=3, image_size=32, max_boxes=2, augment="flip", seed=0)
  in_process, = list(iterate_batches(dataset, **kw))
  with iterate_batches(dataset, num_workers=1, **kw) as it:
    from_process, = list(it)
  for key in in_process:
    np.testing.assert_array_equal(from_process[key], in_process[key])
