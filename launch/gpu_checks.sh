#!/usr/bin/env bash
# Every GPU measurement in one command (one line of JSON each), for an H100/H200 machine:
#   bash launch/gpu_checks.sh > gpu_checks.jsonl
# Step time at METHOD.md's shapes in bf16 and fp32, the loader at paper scale, whole-volume
# inference with and without the 8 flips.
set -uo pipefail
config=configs/three_center.py:paper
python -c 'import jax; print({"devices": [d.device_kind for d in jax.devices()]})'
for shape in "64,160,160" "80,224,224"; do
  python -m launch.bench --what=step --config=$config --config.data.patch_size="($shape)" \
    --config.model.dtype=bfloat16 --repeats=20
done
python -m launch.bench --what=step --config=$config --config.model.dtype=float32 --repeats=10
python -m launch.bench --what=step --config=$config --config.model.dtype=bfloat16 \
  --config.model.remat=True --repeats=20
python -m launch.bench --what=loader --config=$config --loader_batches=50
python -m launch.bench --what=inference --config=$config --config.model.dtype=bfloat16 \
  --inference_shape=100,512,512
