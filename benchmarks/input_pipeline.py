"""Images per second of the COCO-folder input pipeline, by number of loader processes.

Writes a COCO-style folder of JPEG files (640x480, smooth content, 5 boxes each) to a
temporary directory, then times, in one run, for each setting (512 px with SSD augmentation,
1024 px with flip):

* the Grain pipeline (:func:`jaxrank.data.iterate_batches`) with 0 (in the calling thread),
  1 and 2 loader processes;
* the thread-pool pipeline it replaced (commit 7f07d75: up to 4 threads, 2 batches
  prefetched, float32 normalised images built on the host), copied here as the baseline; it
  runs today's per-example code (:func:`jaxrank.data.prepare_example`), so only the
  pipelines differ.

A figure is the best of ``--repeats`` passes of ``--batches`` batches after ``--warmup``
batches (loader processes need a few batches to reach their pace: imports, decoder set-up,
first touches of shared memory; the time to the first batch is printed apart); the clock
stops at the last timed batch, before the pipeline is closed. "Cores busy" is the CPU time
of the loader processes over the timed batches of that pass divided by its wall time (read
from ``/proc``, 1 worker / 2 workers). The Grain batches hold ``uint8`` images: the
normalisation runs on the device, inside the jitted step.

  python benchmarks/input_pipeline.py            # ~2 min on 2 cores
  python benchmarks/input_pipeline.py --quick
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import queue
import tempfile
import threading
import time

import numpy as np
from PIL import Image

from jaxrank import data
from jaxrank.data import batching


def write_coco_folder(root: str, count: int, seed: int = 0) -> tuple[str, str]:
  """``count`` 640x480 JPEG files with smooth random content and their annotations."""
  rng = np.random.default_rng(seed)
  images_dir = os.path.join(root, "images")
  os.makedirs(images_dir, exist_ok=True)
  images, annotations = [], []
  for i in range(count):
    coarse = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((640, 480), Image.Resampling.BICUBIC))
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    name = f"{i:06d}.jpg"
    Image.fromarray(pixels).save(os.path.join(images_dir, name), quality=90)
    images.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
    for k in range(5):
      w, h = rng.uniform(40, 300), rng.uniform(40, 220)
      x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
      annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                          "category_id": 1 + k % 3, "bbox": [x, y, w, h], "area": w * h,
                          "iscrowd": 0})
  path = os.path.join(root, "instances.json")
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": annotations,
               "categories": [{"id": c, "name": f"class{c}"} for c in (1, 2, 3)]}, f)
  return images_dir, path


def thread_pool_batches(dataset, *, batch_size, image_size, max_boxes, augment, seed,
                        num_threads=None, prefetch=2):
  """The replaced pipeline: a background thread fills a queue of ``prefetch`` batches, each
  built by a pool of up to 4 threads (float32 normalised images)."""
  rows = batching.epoch_batch_indices(len(dataset), batch_size=batch_size, shuffle=True,
                                      seed=seed, epoch=0, drop_remainder=True)
  num_threads = num_threads or min(4, os.cpu_count() or 1)

  def make(index):
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, 0, int(index))))
    example, _ = batching.prepare_example(dataset.load(int(index)), image_size=image_size,
                                          max_boxes=max_boxes, augment=augment, rng=rng)
    image = example.pop("image")[: example["image_hw"][0], : example["image_hw"][1]]
    example["image"] = data.transforms.pad_and_normalize(image, image_size)
    return example

  out: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def put(item):
    while not stop.is_set():
      try:
        return out.put(item, timeout=0.05)
      except queue.Full:
        pass

  def produce():
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for row in rows:
        if stop.is_set():
          return
        put(batching.collate(list(pool.map(make, row))))
    put(None)

  producer = threading.Thread(target=produce, daemon=True)
  producer.start()
  try:
    while (batch := out.get()) is not None:
      yield batch
  finally:
    stop.set()
    producer.join()


def loader_cpu_seconds() -> float | None:
  """CPU seconds used so far by this process's live child processes (the loader processes),
  from ``/proc``; None where that is not readable."""
  total = 0.0
  ticks = os.sysconf("SC_CLK_TCK")
  try:
    for child in multiprocessing.active_children():
      with open(f"/proc/{child.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
  except (OSError, ValueError, IndexError):
    return None
  return total


def images_per_second(make_batches, batches: int, repeats: int,
                      warmup: int) -> tuple[float, float, float | None]:
  """(best images/s over ``repeats`` passes, seconds to the first batch of the first pass,
  cores the loader processes kept busy during that best pass)."""
  best, startup, cores = 0.0, None, None
  for _ in range(repeats):
    t0 = time.perf_counter()
    it = make_batches()
    images = 0
    try:
      for i, batch in enumerate(it):
        if i == 0 and startup is None:
          startup = time.perf_counter() - t0
        if i == warmup - 1:
          t1, cpu1 = time.perf_counter(), loader_cpu_seconds()
        elif i >= warmup:
          images += len(batch["image_id"])
        if i == warmup + batches - 1:
          t2, cpu2 = time.perf_counter(), loader_cpu_seconds()  # before close(), which
          break                                                   # takes its own time
    finally:
      if hasattr(it, "close"):
        it.close()
    rate = images / (t2 - t1)
    if rate > best:
      best = rate
      cores = None if cpu1 is None or cpu2 is None else (cpu2 - cpu1) / (t2 - t1)
  return best, startup, cores


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, default=40, help="timed batches per pass")
  parser.add_argument("--warmup", type=int, default=6, help="batches before the timing")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--quick", action="store_true", help="6 timed batches, one pass")
  args = parser.parse_args(argv)
  if args.quick:
    args.batches, args.repeats = 6, 1
  workers = [int(w) for w in args.workers.split(",")]
  needed = (args.batches + args.warmup) * args.batch_size
  print(f"{os.cpu_count()} CPUs; batch {args.batch_size}; best of {args.repeats} x "
        f"{args.batches} batches after {args.warmup}")
  with tempfile.TemporaryDirectory() as root:
    images_dir, annotations = write_coco_folder(root, needed)
    dataset = data.load_coco_folder(images_dir, annotations)
    print("| setting | thread pool (replaced) | " +
          " | ".join(f"Grain, {w} worker{'s' if w != 1 else ''}" for w in workers) +
          " | 2 workers / 1 worker | cores busy in loader processes | startup (s) |")
    print("|---" * (len(workers) + 5) + "|")
    for image_size, augment in ((512, "ssd"), (1024, "flip")):
      kw = dict(batch_size=args.batch_size, image_size=image_size, max_boxes=32,
                augment=augment, seed=0)
      baseline, _, _ = images_per_second(lambda kw=kw: thread_pool_batches(dataset, **kw),
                                         args.batches, args.repeats, args.warmup)
      rates, startups, busy = {}, [], []
      for w in workers:
        rates[w], startup, cores = images_per_second(
          lambda w=w, kw=kw: data.iterate_batches(dataset, drop_remainder=True, num_workers=w,
                                           prefetch=2, **kw),
          args.batches, args.repeats, args.warmup)
        startups.append(f"{startup:.1f}")
        if w:
          busy.append("n/a" if cores is None else f"{cores:.2f}")
      scaling = f"{rates[2] / rates[1]:.2f}x" if 1 in rates and 2 in rates else "n/a"
      print(f"| {image_size} px, {augment} | {baseline:.1f} | " +
            " | ".join(f"{rates[w]:.1f}" for w in workers) +
            f" | {scaling} | {' / '.join(busy)} | {'/'.join(startups)} |", flush=True)


if __name__ == "__main__":
  main()
