"""Box operations: geometry, coding, anchors, assignment, targets and post-processing.

Everything is jit-able with static shapes and works on one image at a time where noted
(``jax.vmap`` over a batch).
"""

from jaxrank.ops.anchors import (
  base_anchors,
  feature_map_sizes,
  generate_anchors,
  num_anchors_per_level,
  num_anchors_per_location,
)
from jaxrank.ops.assigners import Assignment, atss_assign, max_iou_assign
from jaxrank.ops.boxes import (
  aligned_giou,
  aligned_iou,
  aligned_iou_giou,
  box_area,
  box_centers,
  box_cxcywh_to_xyxy,
  box_xywh_to_xyxy,
  box_xyxy_to_cxcywh,
  box_xyxy_to_xywh,
  check_boxes,
  clip_boxes,
  pairwise_giou,
  pairwise_iou,
  pairwise_iou_giou,
  valid_boxes,
)
from jaxrank.ops.coding import decode_boxes, encode_boxes
from jaxrank.ops.deformable_attention import multi_scale_deformable_attention
from jaxrank.ops.matching import Matching, hungarian_match
from jaxrank.ops.postprocess import (
  Detections,
  batched_nms,
  multiclass_nms,
  nms,
  postprocess_detections,
)
from jaxrank.ops.proposals import Proposals, append_gt_boxes, random_sample, rpn_proposals
from jaxrank.ops.roi_align import multilevel_roi_align, roi_align, roi_levels
from jaxrank.ops.targets import box_targets, classification_targets

__all__ = [
    "Assignment", "Detections", "Matching", "Proposals", "aligned_giou", "aligned_iou",
    "aligned_iou_giou", "append_gt_boxes", "atss_assign", "base_anchors", "batched_nms",
    "box_area", "box_centers",
    "box_cxcywh_to_xyxy", "box_targets", "box_xywh_to_xyxy", "box_xyxy_to_cxcywh",
    "box_xyxy_to_xywh", "check_boxes", "classification_targets", "clip_boxes",
    "decode_boxes", "encode_boxes", "feature_map_sizes", "generate_anchors", "hungarian_match",
    "max_iou_assign", "multi_scale_deformable_attention", "multiclass_nms",
    "multilevel_roi_align", "nms", "num_anchors_per_level",
    "num_anchors_per_location",
    "pairwise_giou", "pairwise_iou", "pairwise_iou_giou", "postprocess_detections",
    "random_sample", "roi_align", "roi_levels", "rpn_proposals", "valid_boxes",
]
