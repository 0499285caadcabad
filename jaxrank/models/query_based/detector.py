"""Deformable DETR (Zhu et al., ICLR 2021): backbone C3-C5 + an extra level, deformable
encoder, query decoder, a class and a box head on every decoder layer; optional iterative box
refinement and the two-stage variant."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax import lax

from jaxrank import ops
from jaxrank.models.layers import DTYPES, Conv, GroupNorm, normal_init, xavier_uniform
from jaxrank.models.pretrained import load_torchvision_resnet
from jaxrank.models.query_based import recipes
from jaxrank.models.query_based.config import (
  BACKBONE_MIN_LEVEL,
  LossSettings,
  QueryLossState,
  QueryStatic,
  check_loss_config,
  check_model_config,
  check_no_aux_weights,
  default_loss_config,
)
from jaxrank.models.query_based.transformer import (
  MLP,
  DecoderLayer,
  EncoderLayer,
  LayerNorm,
  Linear,
  box_position_embedding,
  inverse_sigmoid,
  sine_position_embedding,
  split_key,
)
from jaxrank.models.resnet import backbone_input, build_backbone

DROPOUT_SEED = 0
#: Prior probability of the class heads' initial bias (published: 0.01).
PRIOR_PROB = 0.01
#: Stand-in for the published ``inf`` of invalid encoder proposals (in logit space: its
#: sigmoid is exactly 1 in float32, and it keeps every gradient finite).
INVALID_PROPOSAL = 1e4


class LossInputs(NamedTuple):
  """What the loss of a batch needs besides the network outputs: the dropout key (``None``
  without dropout), gt boxes normalised to [0, 1] (xyxy), labels, mask, valid examples and the
  PAP functions (``None`` unless PAP)."""
  dropout_key: jax.Array | None
  gt_boxes: jax.Array
  gt_labels: jax.Array
  gt_mask: jax.Array
  valid: jax.Array
  pap: object


def cell_centers(spatial_shapes):
  """``[S, 2]`` (x, y) centres of every cell of every level in [0, 1], levels flattened in
  order (the encoder's reference points and the two-stage proposals' centres)."""
  centers = []
  for h, w in spatial_shapes:
    ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing="ij")
    centers.append(jnp.stack([xs.reshape(-1), ys.reshape(-1)], -1))
  return jnp.concatenate(centers, axis=0)


class ConvGN(nnx.Module):
  """Conv (Xavier init, as published) + GroupNorm(32): the input projections."""

  def __init__(self, in_features, out_features, kernel_size, *, stride=1, dtype, rngs):
    self.conv = Conv(in_features, out_features, kernel_size, stride=stride, dtype=dtype,
                     kernel_init=xavier_uniform, rngs=rngs)
    self.norm = GroupNorm(out_features, dtype=dtype)

  def __call__(self, x):
    return self.norm(self.conv(x))


class DeformableDETR(nnx.Module):
  """Deformable DETR trained with one loss recipe (see
  :mod:`jaxrank.models.query_based.recipes`).

  Images are the trainer's padded ``S x S`` frames without a padding mask: every level is
  fully valid (valid ratios 1) and boxes are normalised by ``S``.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               loss_config: ml_collections.ConfigDict | None = None, *, rngs: nnx.Rngs):
    static = check_model_config(config)
    self._static = static
    self._loss = check_loss_config(default_loss_config() if loss_config is None
                                   else loss_config)
    check_no_aux_weights(static, self._loss)
    self.name = config.name
    self.num_classes = static.num_classes
    self.image_size = static.image_size
    dtype = DTYPES[config.dtype]
    self.dtype = dtype
    c = static.hidden_dim
    self.backbone = build_backbone(config.backbone, norm=config.norm,
                                   frozen_stages=config.frozen_stages,
                                   min_level=BACKBONE_MIN_LEVEL, dtype=dtype, rngs=rngs)
    in_channels = list(self.backbone.out_channels)
    projections = []
    for level in range(static.num_levels):
      if level < len(in_channels):
        projections.append(ConvGN(in_channels[level], c, 1, dtype=dtype, rngs=rngs))
      else:
        source = in_channels[-1] if level == len(in_channels) else c
        projections.append(ConvGN(source, c, 3, stride=2, dtype=dtype, rngs=rngs))
    self.input_proj = nnx.List(projections)
    self.level_embed = nnx.Param(normal_init(1.0)(rngs.params(), (static.num_levels, c)))
    attention = dict(levels=static.num_levels, heads=static.num_heads, points=static.num_points,
                     spatial_shapes=static.spatial_shapes)
    self.encoder = nnx.List([
        EncoderLayer(c, ffn_dim=static.ffn_dim, dropout_rate=static.dropout, dtype=dtype,
                     rngs=rngs, **attention) for _ in range(static.encoder_layers)])
    attention.pop("heads")
    self.decoder = nnx.List([
        DecoderLayer(c, heads=static.num_heads, ffn_dim=static.ffn_dim,
                     dropout_rate=static.dropout, dtype=dtype, rngs=rngs, **attention)
        for _ in range(static.decoder_layers)])
    if static.two_stage:
      self.enc_output = Linear(c, c, dtype=dtype, rngs=rngs)
      self.enc_output_norm = LayerNorm(c, dtype=dtype)
      self.pos_trans = Linear(2 * c, 2 * c, dtype=dtype, rngs=rngs)
      self.pos_trans_norm = LayerNorm(2 * c, dtype=dtype)
      if static.mixed_selection:
        self.query_embed = nnx.Param(normal_init(1.0)(rngs.params(), (static.num_queries, c)))
    else:
      self.query_embed = nnx.Param(normal_init(1.0)(rngs.params(), (static.num_queries, 2 * c)))
      self.reference_points = Linear(c, 2, dtype=dtype, rngs=rngs)
    num_heads = (static.decoder_layers + static.two_stage) if static.box_refine else 1
    bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
    self.class_embed = nnx.List([
        Linear(c, static.num_classes, dtype=dtype, rngs=rngs,
               bias_init=lambda k, s, d=jnp.float32: jnp.full(s, bias, d))
        for _ in range(num_heads)])
    # Published: wh bias -2 on the first (or shared) box head, 0 everywhere in two-stage.
    wh = 0.0 if static.two_stage else -2.0
    self.bbox_embed = nnx.List([
        MLP(c, c, 4, 3, dtype=dtype, rngs=rngs,
            last_bias=(lambda k, s, d=jnp.float32, v=(wh if i == 0 else 0.0):
                       jnp.asarray([0.0, 0.0, v, v], d)))
        for i in range(num_heads)])

  def static_info(self) -> QueryStatic:
    return self._static

  @property
  def loss_settings(self) -> LossSettings:
    return self._loss

  def _head(self, index: int):
    if not self._static.box_refine:
      index = 0
    return self.class_embed[index], self.bbox_embed[index]

  # ---------------------------------------------------------------------------------------
  # Network.

  def encode(self, images, key=None):
    """Encoder memory ``[B, S, C]`` (levels flattened in order)."""
    static = self._static
    images = jnp.asarray(images)
    size = self.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"images must be [B, {size}, {size}, 3], got {images.shape}")
    feats = self.backbone(backbone_input(images, self.dtype))
    srcs = []
    for level, proj in enumerate(self.input_proj):
      if level < len(feats):
        srcs.append(proj(feats[level]))
      elif level == len(feats):
        srcs.append(proj(feats[-1]))
      else:
        srcs.append(proj(srcs[-1]))
    b = images.shape[0]
    c = static.hidden_dim
    tokens, pos = [], []
    for level, ((h, w), src) in enumerate(zip(static.spatial_shapes, srcs)):
      if src.shape[1:3] != (h, w):
        raise ValueError(f"level {level} is {src.shape[1:3]}, expected {(h, w)}")
      tokens.append(src.reshape(b, h * w, c))
      pos.append(sine_position_embedding(h, w, c) + self.level_embed[level])
    memory = jnp.concatenate(tokens, axis=1)
    pos = jnp.concatenate(pos, axis=0)[None].astype(memory.dtype)
    ref = cell_centers(static.spatial_shapes)
    ref = jnp.broadcast_to(ref[None, :, None, :], (b, ref.shape[0], static.num_levels, 2))
    for layer, layer_key in zip(self.encoder, split_key(key, len(self.encoder))):
      memory = layer(memory, pos, ref, layer_key)
    return memory

  def _encoder_proposals(self, memory):
    """Published ``gen_encoder_output_proposals``: one box per token (its cell centre, side
    ``0.05 · 2^level``) in logit space, and the projected memory; invalid proposals (a
    coordinate outside (0.01, 0.99)) get :data:`INVALID_PROPOSAL` and zero memory."""
    static = self._static
    sides = jnp.concatenate([jnp.full((h * w,), 0.05 * 2.0 ** level)
                             for level, (h, w) in enumerate(static.spatial_shapes)])
    props = jnp.concatenate([cell_centers(static.spatial_shapes), sides[:, None],
                             sides[:, None]], axis=-1)
    ok = jnp.all((props > 0.01) & (props < 0.99), axis=-1)
    unact = jnp.where(ok[:, None], jnp.log(props / (1 - props)), INVALID_PROPOSAL)
    out = jnp.where(ok[None, :, None], memory, 0.0).astype(memory.dtype)
    return self.enc_output_norm(self.enc_output(out)), unact

  def __call__(self, images, key=None):
    """Head outputs: ``{'logits': [D, B, Q, K], 'boxes': [D, B, Q, 4]}`` (cx, cy, w, h in
    [0, 1], float32) for the ``D`` decoder layers, the encoder ``'memory' [B, S, C]``, and with
    ``two_stage`` the encoder proposals' ``'enc_logits' [B, S, K]`` and ``'enc_boxes'
    [B, S, 4]``."""
    static = self._static
    keys = split_key(key, 2)
    memory = self.encode(images, keys[0])
    b, c, q = memory.shape[0], static.hidden_dim, static.num_queries
    out = {"memory": memory}
    if static.two_stage:
      enc_memory, proposals = self._encoder_proposals(memory)
      enc_cls, enc_box = self._head(static.decoder_layers)
      enc_logits = enc_cls(enc_memory).astype(jnp.float32)
      enc_unact = enc_box(enc_memory).astype(jnp.float32) + proposals
      out["enc_logits"] = enc_logits
      out["enc_boxes"] = jax.nn.sigmoid(enc_unact)
      _, top = lax.top_k(lax.stop_gradient(enc_logits[..., 0]), q)
      reference = jax.nn.sigmoid(lax.stop_gradient(
          jnp.take_along_axis(enc_unact, top[..., None], axis=1)))
      pos_tgt = self.pos_trans_norm(self.pos_trans(box_position_embedding(reference, c)))
      query_pos, tgt = pos_tgt[..., :c], pos_tgt[..., c:]
      if static.mixed_selection:
        tgt = jnp.broadcast_to(self.query_embed[...], (b, q, c)).astype(tgt.dtype)
    else:
      embed = jnp.broadcast_to(self.query_embed[...], (b, q, 2 * c)).astype(self.dtype)
      query_pos, tgt = embed[..., :c], embed[..., c:]
      reference = jax.nn.sigmoid(self.reference_points(query_pos).astype(jnp.float32))
    out["logits"], out["boxes"] = self.decode(tgt, query_pos, reference, memory, keys[1])
    return out

  def decode(self, tgt, query_pos, reference, memory, key=None):
    """``(logits [D, B, Q, K], boxes [D, B, Q, 4])`` of queries ``tgt`` / ``query_pos``
    ``[B, Q, C]`` with reference points or boxes ``reference [B, Q, 2 | 4]`` in [0, 1] through
    every decoder layer on ``memory [B, S, C]``."""
    static = self._static
    b, q = tgt.shape[:2]
    all_logits, all_boxes = [], []
    previous = reference
    for index, (layer, layer_key) in enumerate(zip(self.decoder,
                                                   split_key(key, len(self.decoder)))):
      ref = jnp.broadcast_to(reference[:, :, None, :],
                             (b, q, static.num_levels, reference.shape[-1]))
      tgt = layer(tgt, query_pos, ref, memory, layer_key)
      cls_head, box_head = self._head(index)
      delta = box_head(tgt).astype(jnp.float32)
      # Look forward twice: refine the previous layer's boxes with their gradient.
      inv = inverse_sigmoid(previous if static.look_forward_twice else reference)
      if reference.shape[-1] == 4:
        unact = delta + inv
      else:
        unact = delta.at[..., :2].add(inv)
      boxes = jax.nn.sigmoid(unact)
      all_logits.append(cls_head(tgt).astype(jnp.float32))
      all_boxes.append(boxes)
      if static.box_refine:
        reference = lax.stop_gradient(boxes)
        previous = boxes
    return jnp.stack(all_logits), jnp.stack(all_boxes)

  # ---------------------------------------------------------------------------------------
  # Training.

  def loss(self, batch: dict, loss_state):
    """``(loss, metrics, new_loss_state)``: the recipe's set loss (Hungarian matching per
    image) summed over every decoder layer and, with ``two_stage``, the encoder proposals
    (class-agnostic targets).

    Metrics: ``loss``; ``cls_loss``, ``l1_loss``, ``giou_loss`` of the last decoder layer
    (unweighted); ``aux_loss`` (the other layers and the encoder, weighted);
    ``num_positives`` (matched queries of the last layer, whole batch).
    """
    inputs = self._loss_inputs(batch, loss_state)
    out = self(batch["image"], inputs.dropout_key)
    total, metrics = self._set_losses(out, inputs)
    metrics["loss"] = total
    return total, metrics, loss_state._replace(count=loss_state.count + 1)

  def _loss_inputs(self, batch: dict, loss_state) -> LossInputs:
    settings, static = self._loss, self._static
    if not isinstance(loss_state, QueryLossState):
      raise ValueError("the query-based family needs loss_state = init_loss_state(...) "
                       "(a QueryLossState)")
    if settings.loss == "pap" and loss_state.pap is None:
      raise ValueError("PAP needs loss_state.pap (init_loss_state of a 'pap' loss config)")
    batch_size = batch["image"].shape[0]
    if batch_size % settings.groups:
      raise ValueError(f"loss.ranking_groups={settings.groups} must divide the batch size "
                       f"{batch_size}")
    key = None
    if static.dropout > 0:
      key = jax.random.fold_in(jax.random.key(DROPOUT_SEED), loss_state.count)
    valid = jnp.asarray(batch.get("valid", jnp.ones((batch_size,), bool)), bool)
    gt_mask = jnp.asarray(batch["box_mask"], bool) & valid[:, None]
    gt_boxes = jnp.asarray(batch["boxes"], jnp.float32) / static.image_size
    gt_labels = jnp.asarray(batch["labels"], jnp.int32)
    pap = None if loss_state.pap is None else jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float32), loss_state.pap)
    return LossInputs(key, gt_boxes, gt_labels, gt_mask, valid, pap)

  def _set_losses(self, out: dict, inputs: LossInputs):
    """``(total, metrics)`` of the set losses of every decoder layer and the encoder."""
    settings, static = self._loss, self._static

    def set_loss(logits, boxes, labels):
      return recipes.set_loss(settings, logits, boxes, inputs.gt_boxes, labels, inputs.gt_mask,
                              inputs.valid, pap_params=inputs.pap)

    # One set loss vmapped over the decoder layers: traced and compiled once.
    layer_losses, layer_metrics = jax.vmap(lambda lg, bx: set_loss(lg, bx, inputs.gt_labels))(
        out["logits"], out["boxes"])
    total = jnp.sum(layer_losses)
    metrics = {k: v[-1] for k, v in layer_metrics.items()}
    metrics["aux_loss"] = total - layer_losses[-1]
    if static.two_stage:
      enc_loss, _ = set_loss(out["enc_logits"], out["enc_boxes"],
                             jnp.zeros_like(inputs.gt_labels))
      total = total + enc_loss
      metrics["aux_loss"] = metrics["aux_loss"] + enc_loss
      metrics["enc_loss"] = enc_loss
    return total, metrics

  # ---------------------------------------------------------------------------------------
  # Inference.

  def detect(self, images, *, score_threshold: float = 0.05, max_detections: int = 100,
             iou_threshold: float = 0.5, pre_nms_top_k: int = 1000) -> ops.Detections:
    """The best ``max_detections`` (query, class) pairs of the last decoder layer by sigmoid
    score (published ``PostProcess``: no NMS, so ``iou_threshold`` and ``pre_nms_top_k`` are
    not used), boxes clipped to the image; scores at or below ``score_threshold`` are
    padding."""
    del iou_threshold, pre_nms_top_k
    out = self(images)
    logits, boxes = out["logits"][-1], out["boxes"][-1]
    b, q, k = logits.shape
    scores = jax.nn.sigmoid(logits).reshape(b, q * k)
    top = min(max_detections, q * k)
    scores, index = lax.top_k(scores, top)
    size = self.image_size
    xyxy = ops.clip_boxes(ops.box_cxcywh_to_xyxy(boxes) * size, (size, size))
    det_boxes = jnp.take_along_axis(xyxy, (index // k)[..., None], axis=1)
    classes = (index % k).astype(jnp.int32)
    valid = scores > score_threshold
    pad = max_detections - top
    if pad:
      det_boxes = jnp.pad(det_boxes, ((0, 0), (0, pad), (0, 0)))
      scores, classes, valid = (jnp.pad(x, ((0, 0), (0, pad))) for x in (scores, classes, valid))
    zero = ~valid
    return ops.Detections(jnp.where(zero[..., None], 0.0, det_boxes),
                          jnp.where(zero, 0.0, scores), jnp.where(zero, 0, classes), valid)


def build_detector(model_config: ml_collections.ConfigDict,
                   loss_config: ml_collections.ConfigDict | None = None, *,
                   rngs: nnx.Rngs) -> DeformableDETR:
  """A :class:`DeformableDETR`; loads ``model_config.pretrained`` (torchvision ResNet) if
  set."""
  detector = DeformableDETR(model_config, loss_config, rngs=rngs)
  if model_config.pretrained:
    load_torchvision_resnet(detector, model_config.pretrained)
  return detector

