"""The error-driven gradient as a ``jax.custom_vjp`` (internal)."""

from __future__ import annotations

import functools

import jax


def error_driven(impl, num_args: int):
  """Turns ``impl(static, logits, *args) -> (values, grad)`` into a differentiable function.

  ``values`` is a tuple of arrays; ``grad`` (shape and dtype of ``logits``) is the published
  error-driven update. The derivative of the result w.r.t. ``logits`` is
  ``cotangent(values[0]) * grad``: as in the published ``autograd.Function``s only the first
  output carries a gradient, and the ``num_args`` other arguments (targets, masks, localisation
  errors) get none.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def fn(static, logits, *args):
    return impl(static, logits, *args)[0]

  def fwd(static, logits, *args):
    return impl(static, logits, *args)

  def bwd(static, grad, cotangents):
    del static
    return ((cotangents[0] * grad).astype(grad.dtype),) + (None,) * num_args

  fn.defvjp(fwd, bwd)
  return fn
