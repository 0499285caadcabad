import math

import numpy as np

from jaxrank import ops


def test_counts_and_level_order():
  strides = (8, 16, 32, 64, 128)
  anchors, levels = ops.generate_anchors((100, 130), strides=strides)
  k = ops.num_anchors_per_location(ratios=(0.5, 1.0, 2.0), scales_per_octave=3)
  assert k == 9
  sizes = [math.ceil(100 / s) * math.ceil(130 / s) * k for s in strides]
  assert ops.num_anchors_per_level((100, 130), strides=strides) == tuple(sizes)
  assert anchors.shape == (sum(sizes), 4) and anchors.dtype == np.float32
  assert levels.dtype == np.int32
  np.testing.assert_array_equal(levels, np.repeat(np.arange(5), sizes))


def test_hand_checked_anchors():
  anchors, _ = ops.generate_anchors((16, 24), strides=(8,), ratios=(0.5, 1.0, 2.0),
                                    octave_base_scale=4, scales_per_octave=3)
  assert anchors.shape == (2 * 3 * 9, 4)
  np.testing.assert_allclose(anchors[0], [-22.627417, -11.313708, 22.627417, 11.313708],
                             rtol=1e-6)
  s = 32 * 2 ** (1 / 3)
  np.testing.assert_allclose(anchors[4], [-s / 2, -s / 2, s / 2, s / 2], rtol=1e-6)
  np.testing.assert_allclose(anchors[9 + 4], anchors[4] + [8, 0, 8, 0], rtol=1e-6)
  np.testing.assert_allclose(anchors[3 * 9 + 4], anchors[4] + [0, 8, 0, 8], rtol=1e-6)
  np.testing.assert_allclose(anchors[5 * 9 + 4], anchors[4] + [16, 8, 16, 8], rtol=1e-6)


def test_square_int_size_and_single_anchor():
  anchors, levels = ops.generate_anchors(64, strides=(32, 64), ratios=(1.0,),
                                         octave_base_scale=8, scales_per_octave=1)
  assert anchors.shape == (5, 4)
  np.testing.assert_array_equal(levels, [0, 0, 0, 0, 1])
  np.testing.assert_allclose(anchors[-1], [-256, -256, 256, 256])
