"""Search configs: a trainer config (the proxy: model, loss, data, optimizer, train, eval)
plus a ``search`` section. Config files for ``python -m jaxrank.search`` return one from
``get_config()``; see ``configs/search_*.py``. The proxy's model decides what is searched
(:mod:`jaxrank.search.space`: 41 numbers for RetinaNet, 82 for Faster R-CNN)."""

from __future__ import annotations

from jaxrank.search import policy
from jaxrank.search import space as space_lib
from jaxrank.train import config as config_lib
from jaxrank.train import presets
from jaxrank.train.config import ConfigDict
from jaxrank.validation import ConfigError, Section

PARALLEL = ("auto", "vmap", "sequential")
TARGETS = ("synthetic", "coco")


def search_section() -> ConfigDict:
  """The ``search`` fields with the published values (``tools/search.py``)."""
  s = ConfigDict()
  s.num_rounds = policy.NUM_ROUNDS  # T: sigma decays linearly to 0 over T rounds.
  s.max_rounds = 0  # stop this invocation after this many more rounds (0: run until T).
  s.num_samples = policy.NUM_SAMPLES  # sampled losses (proxy trainings) per round.
  s.sigma0 = policy.SIGMA0
  # Start mean: 'identity' (the published start) or the published searched functions,
  # 'retinanet' / 'faster_rcnn' (by proxy, see jaxrank.search.space).
  s.initial = "identity"
  s.clip_eps = policy.CLIP_EPS
  s.learning_rate = policy.LEARNING_RATE  # Adam on the policy mean, per round:
  s.ppo_steps = policy.NUM_STEPS  # steps per round,
  s.warmup_steps = policy.WARMUP_STEPS  # linear warmup, then linear decay.
  s.seed = 0  # sampling (round t uses fold_in(key(seed), t)).
  s.abort_after = 50  # a proxy with more non-finite or stuck (loss == 1) steps scores 0.
  # Gradient scale of the box branch of every head: 0 searches it (the last number per head,
  # 10^(2 theta - 1)); a positive value fixes it (the released search in effect kept 1).
  s.fixed_grad_scale = 0.0
  # 'vmap': the round's proxies as one vmapped computation, sharded over the local devices;
  # 'sequential': one after another (the published way); 'auto': vmap on GPU/TPU,
  # sequential on CPU (where vmap is slower, see README).
  s.parallel = "auto"
  s.target = "synthetic"  # trainer preset of the written config: 'synthetic' or 'coco'.
  s.keep_checkpoints = 3
  s.progress_bar = True
  s.plots = True
  return s


def trainer_config(config: ConfigDict) -> ConfigDict:
  """The proxy's trainer config (every section but ``search``)."""
  c = ConfigDict()
  for key, value in config.items():
    if key != "search":
      c[key] = value
  return c.copy_and_resolve_references()


def validate(config: ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first invalid field."""
  if "search" not in config or not isinstance(config.search, ConfigDict):
    raise ConfigError("a search config needs the section 'search'")
  s = Section(config.search, "search")
  s.fields(search_section().keys())
  for key in ("num_rounds", "ppo_steps", "keep_checkpoints"):
    s.integer(key, min=1)
  for key in ("max_rounds", "warmup_steps", "abort_after", "seed"):
    s.integer(key, min=0)
  if s.integer("num_samples", min=1) < 2:
    raise s.error("num_samples", "must be >= 2 (advantages are rewards minus their mean)")
  s.number("sigma0", above=0.0, max=1.0)
  s.number("clip_eps", above=0.0, max=1.0)
  s.number("learning_rate", above=0.0, max=10.0)
  fixed = s.number("fixed_grad_scale", min=0.0, max=10.0)
  if 0 < fixed < 0.1:
    raise s.error("fixed_grad_scale", f"must be 0 (searched) or in [0.1, 10], got {fixed!r}")
  s.choice("parallel", PARALLEL)
  s.choice("target", TARGETS)
  s.boolean("progress_bar")
  s.boolean("plots")
  proxy = trainer_config(config)
  config_lib.validate(proxy)
  if proxy.loss.name != "pap":
    raise ConfigError(f"config key 'loss.name' must be 'pap' for a search, got {proxy.loss.name!r}")
  s.choice("initial", space_lib.space_of(proxy).initial_names)


def synthetic_search_config() -> ConfigDict:
  """The search of ``configs/search_synthetic.py`` (see there)."""
  c = presets.synthetic_config("pap", name="search_synthetic")
  c.model.fpn_channels = 32
  c.model.head_channels = 32
  c.loss.pap_preset = "identity"
  c.loss.max_positives_per_image = 48
  c.loss.pap_top_k = 1000
  c.data.image_size = 64
  c.data.num_train = 512
  c.data.num_val = 128
  c.data.max_objects = 4
  c.data.min_object_size = 8
  c.data.max_boxes = 8
  c.optimizer.warmup_steps = 30
  c.optimizer.schedule = "constant"  # the published proxy has no decay
  c.train.num_steps = 250
  c.train.checkpoint_every = 0
  c.train.plots = False
  c.eval.batch_size = 64
  c.search = search_section()
  c.search.num_rounds = 6
  c.search.target = "synthetic"
  return c


def faster_rcnn_synthetic_search_config() -> ConfigDict:
  """The search of ``configs/search_synthetic_faster_rcnn.py`` (see there)."""
  c = presets.synthetic_config("faster_rcnn_pap", name="search_synthetic_faster_rcnn")
  c.model.fpn_channels = 32
  c.model.rpn_channels = 32
  c.model.fc_channels = 128
  c.model.rpn_train_pre_nms = 500
  c.model.rpn_train_post_nms = 64
  c.model.rpn_test_pre_nms = 300
  c.model.rpn_test_post_nms = 64
  c.loss.pap_rpn_preset = "identity"
  c.loss.pap_rcnn_preset = "identity"
  c.loss.pap_top_k = 1000
  c.data.image_size = 64
  c.data.num_train = 512
  c.data.num_val = 128
  c.data.max_objects = 4
  c.data.min_object_size = 8
  c.data.max_boxes = 8
  c.optimizer.warmup_steps = 30
  c.optimizer.schedule = "constant"  # the published proxy has no decay
  c.train.num_steps = 100
  c.train.checkpoint_every = 0
  c.train.plots = False
  c.eval.batch_size = 64
  c.search = search_section()
  c.search.num_rounds = 3
  c.search.target = "synthetic"
  return c
