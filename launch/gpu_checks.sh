#!/usr/bin/env bash
# Every GPU measurement as one command (one line of JSON each), for an H100/H200 machine:
#   bash launch/gpu_checks.sh [step] [run] [levers] > gpu_checks.jsonl     (no group: all three)
# step:   the training step at METHOD.md's shapes (2 views of one 80x224x224 patch), bf16 and fp32,
#         with peak memory and compile time.
# run:    a 60-step training run against the bare step, the loader at paper scale, 100x512x512
#         inference with and without the 8 flips; the first run generates the phantoms.
# levers: the bf16 step with one change at a time: depth-folded convs, remat, XLA autotuning off,
#         CUDA graphs off; and the smaller 64x160x160 patch.
# Run one or two groups per device call: each line compiles the paper network afresh.
# Each line runs in its own process under a time limit (GPU_CHECK_LIMIT_S, default 300 s; the
# training run GPU_CHECK_TRAIN_LIMIT_S, default 540 s), so a failure costs only its own row.
# Compiled programs are shared between the lines through a fresh cache, so a line that repeats an
# earlier line's program (the training run's bare step) does not compile it again.
set -uo pipefail
groups=("$@")
[[ ${#groups[@]} -eq 0 ]] && groups=(step run levers)
config=configs/three_center.py:paper
limit=${GPU_CHECK_LIMIT_S:-300}
export JAX_COMPILATION_CACHE_DIR=$(mktemp -d)
bench() { timeout "$limit" python -m launch.bench --config=$config "$@" || echo "{\"failed\": \"$*\"}"; }
python -c 'import jax; print({"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__})'
for group in "${groups[@]}"; do
  case $group in
    step)
      bench --what=step --config.model.dtype=bfloat16 --repeats=20
      bench --what=step --config.model.dtype=float32 --repeats=10 ;;
    run)
      limit=${GPU_CHECK_TRAIN_LIMIT_S:-540} bench --what=train --config.model.dtype=bfloat16 --train_steps=60 --repeats=20
      bench --what=loader --loader_batches=50
      bench --what=inference --config.model.dtype=bfloat16 --inference_shape=100,512,512 ;;
    levers)
      bench --what=step --config.model.dtype=bfloat16 --config.model.conv_impl=depth_folded --repeats=20
      bench --what=step --config.model.dtype=bfloat16 --config.model.remat=True --repeats=20
      XLA_FLAGS=--xla_gpu_autotune_level=0 bench --what=step --config.model.dtype=bfloat16 --repeats=20
      # --xla_gpu_cudnn_gemm_fusion_level=2 aborted the process inside XLA (jax 0.11.2, H200,
      # 2026-11-30: docs/results.md, section 15), so it is not among the levers.
      XLA_FLAGS=--xla_gpu_enable_command_buffer= bench --what=step --config.model.dtype=bfloat16 --repeats=20
      bench --what=step --config.data.patch_size='(64,160,160)' --config.model.dtype=bfloat16 --repeats=20 ;;
    *) echo "unknown group $group: choose step, run or levers" >&2; exit 2 ;;
  esac
done
