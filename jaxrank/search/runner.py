"""The Parameterized AP Loss search loop (``python -m jaxrank.search``).

Round ``t``: sample ``K`` parameter vectors from the policy (key ``fold_in(key(seed), t)``),
train and score the ``K`` proxies (:class:`jaxrank.search.proxy.ProxyTrainer`), update the
policy (:func:`jaxrank.search.policy.update_policy`), then save the search state and the
history (Orbax, one checkpoint per round), ``history.json``, ``search.png`` and
``searched_config.py`` (a trainer config file with the policy mean as ``loss.pap_theta``).
The proxy's model decides what is searched (:mod:`jaxrank.search.space`): 41 numbers of one
RetinaNet head or 82 of Faster R-CNN's RPN and R-CNN heads.
A search started again in the same work directory resumes after the last saved round and
gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import losses
from jaxrank.search import config as search_config
from jaxrank.search import plots as search_plots
from jaxrank.search import policy
from jaxrank.search import space as space_lib
from jaxrank.train import checkpoints as ckpt_lib
from jaxrank.train import config as config_lib
from jaxrank.train import logging as log_lib

log = logging.getLogger("jaxrank.search")

RESULT_CONFIG = "searched_config.py"


class Proxy(Protocol):
  """What the loop needs from a proxy: :meth:`ProxyTrainer.run`."""

  def run(self, loss_params, *, sequential: bool = False, progress: bool = True,
          should_stop=None, desc: str = ...) -> Any: ...


@dataclasses.dataclass
class SearchResult:
  workdir: str
  state: policy.SearchState
  history: list[dict[str, Any]]
  theta: np.ndarray          # policy mean after the last round: the searched parameters
  config_path: str
  space: space_lib.SearchSpace = space_lib.RETINANET


def _space(theta, space):
  return space_lib.space_for_size(np.shape(theta)[-1]) if space is None else space


def with_fixed_grad_scale(theta, search, space: space_lib.SearchSpace | None = None):
  """``theta`` (``[..., 41]`` or ``[..., 82]``) with its gradient-scale numbers (one per head)
  set to ``search.fixed_grad_scale`` when that is fixed (non-zero). ``space`` defaults to the
  one of ``theta``'s length."""
  if not search.fixed_grad_scale:
    return theta
  index = np.asarray(_space(theta, space).grad_scale_indices)
  value = losses.theta_from_reg_weight(float(search.fixed_grad_scale))
  return jnp.asarray(theta).at[..., index].set(value)


def initial_theta(search, space: space_lib.SearchSpace = space_lib.RETINANET) -> np.ndarray:
  """The start mean ``[space.num_params]`` from ``search.initial`` (and
  ``search.fixed_grad_scale``)."""
  theta = space.initial_theta(search.initial)
  return np.array(with_fixed_grad_scale(theta, search, space), np.float32)


def loss_params(thetas, search, space: space_lib.SearchSpace | None = None):
  """The proxies' loss state ``[K]`` of the sampled ``thetas`` ``[K, D]``: a
  :class:`PAPParams` (RetinaNet, ``D = 41``) or a ``two_stage.PAPState`` (Faster R-CNN,
  ``D = 82``; see :meth:`jaxrank.search.space.SearchSpace.loss_state`). ``space`` defaults
  to the one of ``D``."""
  return _space(thetas, space).loss_state(
      thetas, fixed_grad_scale=float(search.fixed_grad_scale))


def use_sequential(search) -> bool:
  if search.parallel == "auto":
    return jax.default_backend() == "cpu"
  return search.parallel == "sequential"


def write_result_config(path: str, theta, *, target: str, round_: int, num_rounds: int,
                        best_theta=None, best_reward: float | None = None, source: str = "",
                        space: space_lib.SearchSpace | None = None) -> str:
  """A trainer config file (``get_config()``; ``get_config('best')`` for the best sample) with
  the searched parameters as ``loss.pap_theta`` of the space's recipe (``space`` defaults to
  the one of ``theta``'s length)."""
  space = _space(theta, space)
  space.check_theta(theta)
  fmt = lambda t: "(" + ", ".join(f"{float(v):.6f}" for v in np.asarray(t).reshape(-1)) + ")"
  base = space.config_expression(target)
  layout = ("jaxrank.losses.params_from_theta" if len(space.heads) == 1
            else "jaxrank.losses.faster_rcnn_params_from_theta")
  best = fmt(best_theta) if best_theta is not None else "None"
  reward = best_reward if best_reward is not None else float("nan")
  text = f'''"""Parameterized AP Loss functions found by ``python -m jaxrank.search`` ({source}).

Policy mean after round {round_} of {num_rounds}; ``{os.path.basename(path)}:best`` selects
the best sampled vector (reward {reward:.4f}). Layout of the {space.num_params} numbers:
{layout}.

  python -m jaxrank.train --config {path}
"""

from jaxrank.train import presets

THETA = {fmt(theta)}
BEST_THETA = {best}


def get_config(which=None):
  which = which or "mean"
  if which not in ("mean", "best"):
    raise ValueError(f"expected 'mean' or 'best', got {{which!r}}")
  c = {base.format(name="searched_pap")}
  c.loss.pap_theta = THETA if which == "mean" or BEST_THETA is None else BEST_THETA
  c.name = "searched_pap" if which == "mean" else "searched_pap_best"
  return c
'''
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def _record(round_: int, thetas, result, new_state: policy.SearchState,
            seconds: float) -> dict[str, Any]:
  return {
      "round": round_,
      "thetas": np.asarray(thetas).round(6).tolist(),
      "rewards": np.asarray(result.rewards, float).round(6).tolist(),
      "ap50": [None if not np.isfinite(v) else round(float(v), 6) for v in result.ap50],
      "failed": np.asarray(result.failed, bool).tolist(),
      "bad_steps": np.asarray(result.bad_steps, int).tolist(),
      "final_loss": [None if not np.isfinite(v) else round(float(v), 6) for v in result.final_loss],
      "mean_reward": float(np.mean(result.rewards)),
      "best_reward": float(new_state.best_reward),
      "mean_theta": np.asarray(policy.policy_mean(new_state)).round(6).tolist(),
      "sigma": float(np.asarray(new_state.sigma).mean()),
      "train_time_s": round(float(result.train_time_s), 2),
      "eval_time_s": round(float(result.eval_time_s), 2),
      "round_time_s": round(seconds, 2),
  }


def search(config, workdir: str, *, proxy: Proxy | None = None, progress: bool | None = None,
           terminate: ckpt_lib.TerminationRequest | None = None) -> SearchResult:
  """Runs (or resumes) the search of ``config`` in ``workdir``.

  ``proxy`` defaults to a :class:`jaxrank.search.proxy.ProxyTrainer` of the config; tests
  pass a cheap stand-in. Raises :class:`jaxrank.search.proxy.Interrupted` when
  ``terminate`` is requested (SIGTERM); the rounds completed so far are saved.
  """
  search_config.validate(config)
  s = config.search
  space = space_lib.space_of(search_config.trainer_config(config))
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  progress = bool(s.progress_bar) if progress is None else progress
  _warn_if_config_changed(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
  log_lib.write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
  if proxy is None:
    from jaxrank.search.proxy import ProxyTrainer

    proxy = ProxyTrainer(search_config.trainer_config(config), abort_after=int(s.abort_after))

  fresh = policy.init_search_state(initial_theta(s, space), sigma0=float(s.sigma0),
                                   num_rounds=int(s.num_rounds))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                                       keep=int(s.keep_checkpoints), async_save=False)
  try:
    restored = checkpointer.restore_latest(jax.tree.map(np.asarray, fresh))
  except ckpt_lib.IncompatibleCheckpointError as e:
    checkpointer.close()
    raise config_lib.ConfigError(
        f"{workdir} holds another kind of search (this one has {space.num_params} numbers per "
        f"vector: a {space.name} proxy). Use another --workdir. ({e})") from e
  if restored is None:
    state, history = fresh, []
  else:
    round_, state, meta = restored
    state = jax.tree.map(jnp.asarray, state)
    history = list(meta["history"])[:round_]
    if int(state.num_rounds) != int(s.num_rounds) or len(history) != round_:
      raise config_lib.ConfigError(
          f"{workdir} holds a search of {int(state.num_rounds)} rounds with {len(history)} "
          f"recorded; search.num_rounds is {s.num_rounds}. Use another --workdir.")
    log.info("resumed the search after round %d of %d", round_, int(s.num_rounds))

  total = int(s.num_rounds)
  stop = total if not s.max_rounds else min(total, int(state.round) + int(s.max_rounds))
  sequential = use_sequential(s)
  key = jax.random.key(int(s.seed))
  config_path = os.path.join(workdir, RESULT_CONFIG)
  log.info("search: %s proxy, %d numbers, rounds %d..%d of %d, %d samples per round, proxies "
           "%s, workdir %s", space.name, space.num_params, int(state.round) + 1, stop, total,
           s.num_samples, "one after another" if sequential else "vmapped", workdir)
  should_stop = (lambda: terminate.requested) if terminate is not None else None
  try:
    while int(state.round) < stop:
      t = int(state.round)
      t0 = time.time()
      thetas = with_fixed_grad_scale(
          policy.sample(jax.random.fold_in(key, t), state.mu_logit, state.sigma,
                        int(s.num_samples)), s, space)
      result = proxy.run(loss_params(thetas, s, space), sequential=sequential, progress=progress,
                         should_stop=should_stop, desc=f"round {t + 1}/{total}")
      rewards = jnp.nan_to_num(jnp.asarray(result.rewards, jnp.float32), nan=0.0)
      state = policy.update_policy(state, thetas, rewards, clip_eps=float(s.clip_eps),
                                   learning_rate=float(s.learning_rate), num_steps=int(s.ppo_steps),
                                   warmup_steps=int(s.warmup_steps))
      history.append(_record(t + 1, thetas, result, state, time.time() - t0))
      checkpointer.save(t + 1, jax.tree.map(np.asarray, state), {"history": history})
      _write_outputs(workdir, config_path, state, history, s, space, plots=bool(s.plots))
      h = history[-1]
      log.info("round %d/%d: reward mean %.4f max %.4f (best so far %.4f), %d failed, "
               "sigma %.3f, %.0fs (train %.0fs, eval %.0fs)", t + 1, total, h["mean_reward"],
               max(h["rewards"]), h["best_reward"], sum(h["failed"]), h["sigma"],
               h["round_time_s"], h["train_time_s"], h["eval_time_s"])
  finally:
    checkpointer.close()
  if history and not os.path.exists(config_path):
    _write_outputs(workdir, config_path, state, history, s, space, plots=bool(s.plots))
  return SearchResult(workdir=workdir, state=state, history=history,
                      theta=np.asarray(policy.policy_mean(state)), config_path=config_path,
                      space=space)


#: Fields that may change between invocations of one search without changing its meaning.
_RUN_FIELDS = ("search.max_rounds", "search.progress_bar", "search.plots", "train.progress_bar")


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _warn_if_config_changed(path: str, config: dict[str, Any]) -> None:
  """A resumed search whose config differs from the saved one mixes two searches: warn,
  naming the fields."""
  if not os.path.isfile(path):
    return
  with open(path) as f:
    saved = _flat(json.load(f))
  current = _flat(json.loads(json.dumps(config)))
  changed = sorted(k for k in set(saved) | set(current)
                   if k not in _RUN_FIELDS and saved.get(k) != current.get(k))
  if changed:
    log.warning("the config differs from the one this search was started with in %s; the "
                "rounds before and after the change are not comparable (use another --workdir "
                "for a new search)", ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
                                               for k in changed[:10]))


def _write_outputs(workdir, config_path, state, history, s, space, *, plots: bool) -> None:
  log_lib.write_json(os.path.join(workdir, "history.json"), history)
  theta = np.asarray(with_fixed_grad_scale(policy.policy_mean(state), s, space))
  write_result_config(config_path, theta, target=s.target, round_=int(state.round),
                      num_rounds=int(s.num_rounds), best_theta=np.asarray(state.best_theta),
                      best_reward=float(state.best_reward), source=os.path.basename(workdir),
                      space=space)
  if plots:
    search_plots.plot_search(history, os.path.join(workdir, "search.png"))
