#!/usr/bin/env bash
# Train across the nodes of a hostfile ("<hostname> slots=<GPUs>" per line). Paths must be visible on every node
# (shared filesystem); put NCCL/HF variables in .deepspeed_env. Extra arguments are passed to dflash_ds.train.
#
# The hostfile: `cp launch/hostfile.example launch/hostfile` and list your nodes (or HOSTFILE=another path).
#
# pdsh mode (default): run once, on the first node; DeepSpeed ssh-es into the others (needs passwordless ssh).
#   HOSTFILE=launch/hostfile MODEL=/models/Qwen3-8B DATA=/shared/train_regen.jsonl OUT=/shared/runs/q8b launch/multi_node.sh
#
# no-ssh mode (NODE_RANK set): run the same command on every node yourself, with NODE_RANK=0..N-1 and MASTER_ADDR
# the first node's address: for clusters without passwordless ssh (Slurm, Kubernetes, a job scheduler that starts
# one task per node). Every node needs the same hostfile; tests/test_cluster.py runs this mode on loopback.
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=... MODEL=... DATA=... OUT=... launch/multi_node.sh --dist-timeout 600
set -euo pipefail
source "$(dirname "$0")/common.sh"
HOSTFILE=${HOSTFILE:-launch/hostfile}
if [[ ! -f "$HOSTFILE" ]]; then
  echo "multi_node.sh: no hostfile at $HOSTFILE: cp launch/hostfile.example launch/hostfile and list your nodes" \
       "(\"<hostname> slots=<GPUs>\" per line), or set HOSTFILE" >&2
  exit 2
fi
MODEL=${MODEL:?set MODEL}
DATA=${DATA:?set DATA}
OUT=${OUT:?set OUT (on a shared filesystem)}
CONFIG=${CONFIG:-ds_configs/zero3.json}
if [[ -n "${NODE_RANK:-}" ]]; then
  mode=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first node}"
        --master_port "${MASTER_PORT:-29500}")
else
  mode=(--launcher pdsh)
fi
resolve_deepspeed
exec "${DEEPSPEED[@]}" --hostfile "$HOSTFILE" "${mode[@]}" --module dflash_ds.train \
  --deepspeed_config "$CONFIG" --model-path "$MODEL" --train-data "$DATA" --output-dir "$OUT" \
  --block-size 16 --max-length 2048 --gradient-checkpointing --save-interval 500 --resume auto "$@"
