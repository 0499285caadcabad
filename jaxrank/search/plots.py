"""``search.png``: rewards per round, the policy mean of every searched number per round, and
the five PAP functions of the current mean against the identity start (one panel per head:
RetinaNet's, or Faster R-CNN's RPN and R-CNN side by side)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxrank.losses import parameterized
from jaxrank.search import space as space_lib
from jaxrank.train.plots import pyplot, save_figure

_COLORS = {"h1": "tab:blue", "h2": "tab:orange", "i1": "tab:green", "i2": "tab:red",
           "i3": "tab:purple"}
_HEAD_STYLES = ("-", "--")
_HEAD_TITLES = {"retinanet": "", "rpn": "RPN ", "rcnn": "R-CNN "}


def plot_search(history: Sequence[Mapping[str, Any]], path: str) -> str | None:
  if not history:
    return None
  plt = pyplot()
  rounds = np.array([h["round"] for h in history])
  means = np.array([h["mean_theta"] for h in history])
  space = space_lib.space_for_size(means.shape[-1])
  heads = len(space.heads)
  fig, axes = plt.subplots(1, 2 + heads, figsize=(17 + 5.5 * (heads - 1), 4.5))

  ax = axes[0]
  for h in history:
    r = np.asarray(h["rewards"], float)
    ax.scatter(np.full(r.shape, h["round"]), r, s=12, c="0.6", zorder=1)
  ax.plot(rounds, [h["mean_reward"] for h in history], "o-", label="mean of the round", zorder=2)
  ax.plot(rounds, [h["best_reward"] for h in history], "s--", label="best so far", zorder=2)
  ax.set_xlabel("round")
  ax.set_ylabel("reward (COCO AP, held-out split)")
  ax.set_title("rewards")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)

  ax = axes[1]
  for h, head in enumerate(space.heads):
    style, title = _HEAD_STYLES[h], _HEAD_TITLES[head]
    for name in parameterized.FUNCTION_ORDER:
      for j, column in enumerate(means[:, space.function_slice(h, name)].T):
        ax.plot(rounds, column, color=_COLORS[name], ls=style, lw=1, alpha=0.8,
                label=f"{title}f_{name.upper()}" if j == 0 else None)
    ax.plot(rounds, means[:, space.grad_scale_indices[h]], color="k", ls=style, lw=2,
            label=f"{title}grad scale")
  ax.plot(rounds, [h["sigma"] for h in history], color="k", ls=":", label="sigma")
  ax.set_ylim(0, 1)
  ax.set_xlabel("round")
  ax.set_ylabel("policy mean of theta")
  ax.set_title("parameters")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)

  x = np.linspace(0, 1, 201, dtype=np.float32)
  for ax, head, params in zip(axes[2:], space.heads, space.head_params(means[-1])):
    for name in parameterized.FUNCTION_ORDER:
      y = np.asarray(parameterized.piecewise_linear(x, getattr(params, name)))
      ax.plot(x, y, color=_COLORS[name], label=f"f_{name.upper()}")
    ax.plot(x, x, color="0.5", ls="--", lw=1, label="identity")
    ax.set_title(f"{_HEAD_TITLES[head]}functions after round {int(rounds[-1])} "
                 f"(grad scale {float(params.grad_scale):.3g})")
    ax.set_xlabel("x")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = save_figure(fig, path)
  plt.close(fig)
  return path
