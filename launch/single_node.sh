#!/usr/bin/env bash
# Train a drafter on one node: every GPU of this machine (1 GPU: one rank), or 2 CPU ranks (gloo) when no GPU is
# visible or DS_ACCELERATOR=cpu is set.
#   MODEL=/models/Qwen3-8B DATA=data/train_regen.jsonl OUT=runs/qwen3-8b launch/single_node.sh [extra flags]
# NUM_GPUS=N sets the number of ranks (DeepSpeed then uses GPUs 0..N-1 and ignores CUDA_VISIBLE_DEVICES); without
# it, CUDA_VISIBLE_DEVICES picks the GPUs. PYTHON (default python3) is the interpreter that holds torch and
# dflash-ds; `deepspeed` comes from PATH, else from that interpreter.
set -euo pipefail
source "$(dirname "$0")/common.sh"
MODEL=${MODEL:?set MODEL to a from_pretrained directory}
DATA=${DATA:?set DATA to a JSONL conversation file}
OUT=${OUT:-runs/dflash}
CONFIG=${CONFIG:-ds_configs/zero3.json}
resolve_deepspeed

ranks=()
if [[ -n "${NUM_GPUS:-}" ]]; then
    ranks=(--num_gpus "$NUM_GPUS")
elif [[ "${DS_ACCELERATOR:-}" == cpu ]]; then
    ranks=(--num_gpus 2)
    echo "single_node.sh: DS_ACCELERATOR=cpu: 2 CPU ranks (gloo)" >&2
else
    if ! gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())'); then
        echo "single_node.sh: '$PYTHON' cannot import torch: activate the environment dflash-ds is installed in," \
             "or set PYTHON=VENV/bin/python" >&2
        exit 2
    fi
    if [[ "$gpus" == 0 ]]; then
        echo "single_node.sh: no GPU visible: 2 CPU ranks (gloo, DS_ACCELERATOR=cpu)" >&2
        export DS_ACCELERATOR=cpu
        ranks=(--num_gpus 2)
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        # DeepSpeed maps CUDA_VISIBLE_DEVICES to --include itself, and ignores it when --num_gpus is given
        echo "single_node.sh: $gpus GPU(s) (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES), one rank each" >&2
    else
        echo "single_node.sh: $gpus GPU(s), one rank each" >&2
        ranks=(--num_gpus "$gpus")
    fi
fi
exec "${DEEPSPEED[@]}" ${ranks[@]+"${ranks[@]}"} --master_port "${MASTER_PORT:-29500}" --module dflash_ds.train \
  --deepspeed_config "$CONFIG" --model-path "$MODEL" --train-data "$DATA" --output-dir "$OUT" \
  --block-size 16 --max-length 2048 --gradient-checkpointing --save-interval 500 --resume auto "$@"
