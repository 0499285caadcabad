#!/usr/bin/env bash
# Loss and detector-step ratios on whatever accelerator JAX finds, in at most about 5 minutes.
#
#   bash benchmarks/accelerator.sh            # from the repository root
#
# 1. benchmarks/losses.py: every ranking loss at N = 1e6 and 8e6, P = 1000 and 5000, as ratios to
#    the fused focal loss and to optax's focal loss, the unbounded call (no max_positives under
#    jit) against the bounded one, and XLA's buffer plans (at most LOSS_SECONDS, default 110 s).
# 2. benchmarks/detector.py: RetinaNet train steps of the RetinaNet recipes as ratios to focal +
#    smooth L1 (at most DETECTOR_SECONDS, default 180 s; one line per recipe as it finishes, so a
#    cut-off run still reports the recipes it reached). DETECTOR_ARGS replaces its options.
set -uo pipefail

if [[ ! -f benchmarks/losses.py || ! -d jaxrank ]]; then
  echo "run this from the repository root: bash benchmarks/accelerator.sh" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
LOSS_SECONDS=${LOSS_SECONDS:-110}
DETECTOR_SECONDS=${DETECTOR_SECONDS:-180}
DETECTOR_ARGS=${DETECTOR_ARGS:-"--detector retinanet --steps 3 --warmup 1"}

"$PYTHON" -c 'import jax; print("devices:", jax.devices())'

echo "== losses (at most ${LOSS_SECONDS} s)"
timeout --signal=INT --kill-after=10 "$LOSS_SECONDS" \
  "$PYTHON" benchmarks/losses.py --sizes 1e6,8e6 --positives 1000,5000 --repeats 5
status=$?
[[ $status -eq 124 || $status -eq 130 ]] && echo "(losses: cut off after ${LOSS_SECONDS} s)"

echo "== detector train steps (at most ${DETECTOR_SECONDS} s)"
# shellcheck disable=SC2086
timeout --signal=INT --kill-after=10 "$DETECTOR_SECONDS" \
  "$PYTHON" benchmarks/detector.py $DETECTOR_ARGS
status=$?
[[ $status -eq 124 || $status -eq 130 ]] && echo "(detector: cut off after ${DETECTOR_SECONDS} s)"
exit 0
