#!/usr/bin/env bash
# Train a drafter on one node: every GPU of this machine (or 2 CPU ranks with DS_ACCELERATOR=cpu).
#   MODEL=/models/Qwen3-8B DATA=data/train_regen.jsonl OUT=runs/qwen3-8b launch/single_node.sh [extra flags]
set -euo pipefail
MODEL=${MODEL:?set MODEL to a from_pretrained directory}
DATA=${DATA:?set DATA to a JSONL conversation file}
OUT=${OUT:-runs/dflash}
CONFIG=${CONFIG:-ds_configs/zero3.json}
NUM_GPUS=${NUM_GPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 2))')}
exec deepspeed --num_gpus "$NUM_GPUS" --module dflash_ds.train \
  --deepspeed_config "$CONFIG" --model-path "$MODEL" --train-data "$DATA" --output-dir "$OUT" \
  --block-size 16 --max-length 2048 --gradient-checkpointing --save-interval 500 --resume auto "$@"
