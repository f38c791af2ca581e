#!/usr/bin/env bash
# Train across the nodes of a hostfile with DeepSpeed's default pdsh launcher (run on the first node).
#   HOSTFILE=launch/hostfile MODEL=/models/Qwen3-8B DATA=/shared/train_regen.jsonl OUT=/shared/runs/q8b launch/multi_node.sh
# Paths must be visible on every node (shared filesystem); put NCCL/HF variables in .deepspeed_env.
set -euo pipefail
HOSTFILE=${HOSTFILE:-launch/hostfile}
MODEL=${MODEL:?set MODEL}
DATA=${DATA:?set DATA}
OUT=${OUT:?set OUT (on a shared filesystem)}
CONFIG=${CONFIG:-ds_configs/zero3.json}
exec deepspeed --hostfile "$HOSTFILE" --launcher pdsh --module dflash_ds.train \
  --deepspeed_config "$CONFIG" --model-path "$MODEL" --train-data "$DATA" --output-dir "$OUT" \
  --block-size 16 --max-length 2048 --gradient-checkpointing --save-interval 500 --resume auto "$@"
