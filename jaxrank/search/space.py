"""What a search searches for its proxy detector: the searched vector, its start, its gradient
scales and the detector's loss state it maps to.

============  =======  ==============================================  ======================
proxy         numbers  layout of ``theta``                             loss state
============  =======  ==============================================  ======================
RetinaNet     41       5 functions x 8, then the gradient scale        ``PAPParams``
(dense)                (:func:`jaxrank.losses.params_from_theta`)
Faster R-CNN  82       the RPN's 5 functions x 8, the R-CNN's 5 x 8,   ``PAPState(rpn, rcnn,
(two-stage)            the RPN's scale, the R-CNN's scale (published;  count=0)``
                       :func:`~jaxrank.losses.faster_rcnn_params_from_theta`)
============  =======  ==============================================  ======================

In both the gradient scales are the last numbers (one per head). ``search.initial`` names the
start: RetinaNet 'identity' (the published start) or 'retinanet' (the published searched
functions); Faster R-CNN 'identity' (identity functions and scale 1 in both heads, the
published start) or 'faster_rcnn' (the published searched functions, ``PRESETS
['faster_rcnn_rpn']`` for the RPN and ``PRESETS['faster_rcnn_rcnn']`` for the R-CNN).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxrank import losses, models
from jaxrank.losses import parameterized
from jaxrank.models import two_stage
from jaxrank.validation import ConfigError

#: Searched numbers of one head's functions (5 functions x 8) and of one head (with its scale).
NUM_FUNCTION_PARAMS = len(parameterized.FUNCTION_ORDER) * parameterized.NUM_THETA
NUM_HEAD_PARAMS = parameterized.NUM_SEARCH_PARAMS


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """The searched vector of one kind of proxy (see the module docstring).

  Attributes:
    name: 'retinanet' or 'faster_rcnn'.
    heads: the PAP heads, in the order of their blocks in ``theta``.
    initial: ``search.initial`` names -> one :data:`jaxrank.losses.PRESETS` name per head.
    synthetic_recipe / coco_recipe: the trainer presets of the written config
      (``presets.synthetic_config(synthetic_recipe)``, ``presets.coco_config(coco_recipe)``).
  """
  name: str
  heads: tuple[str, ...]
  initial: tuple[tuple[str, tuple[str, ...]], ...]
  synthetic_recipe: str
  coco_recipe: str

  @property
  def num_params(self) -> int:
    return len(self.heads) * NUM_HEAD_PARAMS

  @property
  def initial_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.initial)

  @property
  def grad_scale_indices(self) -> tuple[int, ...]:
    """Positions of the heads' gradient scales in ``theta`` (the last numbers)."""
    first = len(self.heads) * NUM_FUNCTION_PARAMS
    return tuple(range(first, first + len(self.heads)))

  def function_slice(self, head: int, function: str) -> slice:
    """Position of head ``head``'s function ``function`` ('h1', ...: 8 numbers) in ``theta``."""
    start = head * NUM_FUNCTION_PARAMS
    start += parameterized.FUNCTION_ORDER.index(function) * parameterized.NUM_THETA
    return slice(start, start + parameterized.NUM_THETA)

  def check_theta(self, theta) -> None:
    shape = np.shape(theta)
    if shape[-1:] != (self.num_params,):
      raise ValueError(f"a {self.name} search has {self.num_params} numbers per vector; got "
                       f"shape {shape}")

  def head_params(self, theta) -> tuple[losses.PAPParams, ...]:
    """Each head's :class:`PAPParams` of ``theta`` ``[..., num_params]`` (as the trainer maps
    ``loss.pap_theta``)."""
    self.check_theta(theta)
    theta = jnp.asarray(theta, jnp.float32)
    if len(self.heads) == 1:
      return (losses.params_from_theta(theta),)
    return tuple(losses.faster_rcnn_params_from_theta(theta))

  def theta_from_heads(self, params) -> np.ndarray:
    """Inverse of :meth:`head_params`."""
    if len(params) != len(self.heads):
      raise ValueError(f"a {self.name} search needs {len(self.heads)} PAPParams, got "
                       f"{len(params)}")
    if len(self.heads) == 1:
      return np.asarray(losses.theta_from_params(params[0]), np.float32)
    return np.asarray(losses.theta_from_faster_rcnn_params(*params), np.float32)

  def initial_theta(self, name: str) -> np.ndarray:
    """The start ``[num_params]`` called ``name`` (:attr:`initial_names`)."""
    presets = dict(self.initial)
    if name not in presets:
      raise ValueError(f"search.initial of a {self.name} search must be one of "
                       f"{self.initial_names}, got {name!r}")
    return self.theta_from_heads([losses.PRESETS[p] for p in presets[name]])

  def loss_state(self, thetas, *, fixed_grad_scale: float = 0.0):
    """The proxies' loss state of ``thetas`` ``[K, num_params]``, with a leading ``K`` axis:
    :class:`PAPParams` (RetinaNet) or :class:`jaxrank.models.two_stage.PAPState` with the
    RPN sampler's counter at 0 (Faster R-CNN). A positive ``fixed_grad_scale`` sets every
    head's gradient scale to exactly that value."""
    params = self.head_params(thetas)
    if fixed_grad_scale:
      params = tuple(p._replace(grad_scale=jnp.full(p.grad_scale.shape, float(fixed_grad_scale),
                                                    jnp.float32)) for p in params)
    if len(self.heads) == 1:
      return params[0]
    count = jnp.zeros(jnp.shape(params[0].grad_scale), jnp.int32)
    return two_stage.PAPState(params[0], params[1], count)

  def config_expression(self, target: str) -> str:
    """Python expression (with ``presets`` imported) of the written config's base, with a
    ``{name}`` field for the synthetic one."""
    if target == "synthetic":
      return f'presets.synthetic_config("{self.synthetic_recipe}", name="{{name}}")'
    return f'presets.coco_config("{self.coco_recipe}")'


RETINANET = SearchSpace(
    name="retinanet", heads=("retinanet",),
    initial=(("identity", ("identity",)), ("retinanet", ("retinanet",))),
    synthetic_recipe="pap", coco_recipe="retinanet_pap")
FASTER_RCNN = SearchSpace(
    name="faster_rcnn", heads=("rpn", "rcnn"),
    initial=(("identity", ("identity", "identity")),
             ("faster_rcnn", ("faster_rcnn_rpn", "faster_rcnn_rcnn"))),
    synthetic_recipe="faster_rcnn_pap", coco_recipe="faster_rcnn_pap")
SPACES = (RETINANET, FASTER_RCNN)


def space_of(trainer_config) -> SearchSpace:
  """The search space of a proxy trainer config (its ``model`` and ``loss`` sections)."""
  family = models.family_of(trainer_config.model).name
  if trainer_config.loss.name != "pap":
    raise ConfigError(f"config key 'loss.name' must be 'pap' for a search, got "
                      f"{trainer_config.loss.name!r}")
  if family == "dense":
    return RETINANET
  if family == "two_stage" and trainer_config.model.name == "faster_rcnn":
    return FASTER_RCNN
  raise ConfigError(f"config key 'model.name': the search has proxies of the dense family "
                    f"(RetinaNet) and Faster R-CNN, got {trainer_config.model.name!r}")


def space_for_size(num_params: int) -> SearchSpace:
  """The search space with ``num_params`` numbers (41 or 82)."""
  for space in SPACES:
    if space.num_params == int(num_params):
      return space
  raise ValueError(f"no search has {num_params} numbers per vector; known: "
                   f"{[s.num_params for s in SPACES]}")
