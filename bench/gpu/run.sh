#!/usr/bin/env bash
# One-call GPU benchmark for a lent H100 (device tool): see bench/gpu/gpu_bench.py for what it measures.
#
# Device time: a session has 15 minutes of device time in total, all calls together (the machine's start, every
# call, its idle time; no machine starts with under 4 minutes left), and one call runs at most 10 minutes. The
# calls below do not all fit in one session: run the smoke (step 4, one call under 8 minutes) FIRST and alone;
# run another part (2, 2b) only if the device tool's status still shows more budget_left_s than that call's
# timeout_s plus a minute, usually in a later session, one part a session. Give the machine back (give_back) after
# the last call rather than let it idle on the budget.
#
# 1. Prepare the wheels ONCE on the development machine (network), from the repository root:
#
#      bash bench/gpu/run.sh --prepare
#
#    which runs exactly:
#
#      mkdir -p bench/gpu/wheels
#      pip wheel --no-deps --no-build-isolation -w bench/gpu/wheels deepspeed==0.19.8   # sdist only on PyPI: a py3-none-any wheel, no ops compiled
#      pip download --no-deps -d bench/gpu/wheels peft==0.21.2 transformers==5.24.0 hjson==3.1.0 \
#          pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 \
#          datasets==5.2.0 dill==0.4.1
#      pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d bench/gpu/wheels pydantic-core==2.46.4 \
#          regex==2026.5.9 multiprocess==0.70.19
#
#    The device image (Python 3.12, torch 2.11, transformers 5.17) lacks deepspeed and deepspeed's hjson/pydantic;
#    transformers 5.24 and peft 0.21.2 are carried so the GPU runs the versions the project is tested with; regex
#    because transformers 5.24 checks regex >= 2025.10.22 at import and the image's version is not on record;
#    datasets (with dill and multiprocess, which the image lacks; its pyarrow, pandas, xxhash and fsspec are used)
#    because the trainer tokenises its data through it (--smoke). About 20 MiB. They travel as wheels, installed on
#    the device with `pip install --no-index --no-deps --target /tmp/site` (see below; the device can fetch
#    nothing). bench/gpu/wheels/ must not be committed (it is in .gitignore).
#
# 2. Run on the device (one call, about 4-6 minutes of device time; the script stops itself at 470 s; only if the
#    smoke has run and budget_left_s allows it, see "Device time" above):
#
#      run(command="bash bench/gpu/run.sh", carry=["bench/gpu/wheels"], timeout_s=540)
#
#    It prints a JSON report and a short summary table last, and writes $OUT/gpu_bench.json and $OUT/gpu_bench.log.
#
# 2b. Speculative decoding end to end on the GPU (bench/spec_decode.py with --device cuda): a random Qwen3-1.7B-shaped
#    target with a random adapter (is the loop within 10% of its own cost-model bound at a real size?) and, when
#    bench/gpu/carry/ holds them, the demo's trained tiny target + adapter + held-out prompts (tau and wall-clock
#    speedup with a trained adapter). Prepare the carry folder on the dev machine after `dflash-ds demo`:
#
#      bash bench/gpu/run.sh --prepare-spec-decode demo_work     # copies target, adapter, prompts (about 12 MiB)
#      run(command="bash bench/gpu/run.sh --spec-decode", carry=["bench/gpu/wheels", "bench/gpu/carry"], timeout_s=600)
#
#    The two drafter kinds (the demo's LoRA adapter and standalone drafter, both copied by --prepare-spec-decode) side
#    by side in one `dflash-ds eval` on the GPU, eager and compiled (the README's equal-time table, on a GPU):
#
#      run(command="SPEC_DECODE_PARTS='kinds kinds_compiled' bash bench/gpu/run.sh --spec-decode",
#          carry=["bench/gpu/wheels", "bench/gpu/carry"], timeout_s=480)
#
#    It writes $OUT/spec_decode_<part>.json per part (SPEC_DECODE_PARTS, below) and $OUT/spec_decode.log: both loops
#    (two-forward, fused) against AR, eager and compiled (--compile compile: static cache + CUDA graphs), at the
#    Qwen3-1.7B and Qwen3-8B shapes and on the trained tiny adapter. Smoke-test every part's command on the CPU first:
#
#      bash bench/gpu/run.sh --spec-decode-cpu-smoke
#
# 3. Test the code path without a GPU (tiny shapes, CPU, local Python; also checks that the carried wheel set
#    resolves for the device's Python 3.12 / x86-64):
#
#      bash bench/gpu/run.sh --cpu-smoke
#
# 4. GPU acceptance in one command (bench/gpu/smoke.py): ZeRO-2 and ZeRO-3 training through the deepspeed launcher
#    (NCCL), resume, export, dflash-ds eval with --compile none|static|compile and both loops, greedy outputs
#    against transformers' generate; one PASS/FAIL line per check, exit status 1 if any failed. The first device
#    call of a session. --budget-s N (default 420: 7 minutes) is the whole call's time, wheel install included:
#    run.sh measures what the install and the import check took and gives the rest, less 20 s, to the outer
#    `timeout` (which SIGINTs, then SIGKILLs 20 s later) and, less 50 s, to smoke.py --time-budget-s (no command
#    runs past it), so the script ends within N seconds. Needs the wheels of step 1 (deepspeed, and datasets for
#    the trainer's data):
#
#      run(command="bash bench/gpu/run.sh --smoke --budget-s 420", carry=["bench/gpu/wheels"], timeout_s=450)
#
#    (timeout_s 30 s above --budget-s; keep both under 480.)
#
#    It writes $OUT/smoke.log and $OUT/smoke.json. The same checks on a CPU (2 gloo ranks, tiny shapes; no wheels,
#    the local Python; CI runs it: tests/test_gpu_smoke.py; smoke.py's own --time-budget-s unless --budget-s is
#    given):
#
#      bash bench/gpu/run.sh --smoke --device cpu
#
# Exit codes: 2 no wheels (or a bad --budget-s), 3 no GPU / torch sees no CUDA, 4 wheel install failed, 5 (--smoke)
# under 60 s of --budget-s left for the checks, else gpu_bench.py's own (smoke.py's with --smoke: 1 when a check
# failed; 124 when the outer timeout stopped it).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
WHEELS=bench/gpu/wheels
# the kinds parts: the demo's two trained drafters side by side in one eval (the GPU part and its CPU smoke)
kinds=(python3 -m dflash_ds.cli eval --model-path bench/gpu/carry/target --adapter bench/gpu/carry/adapter
       --drafter bench/gpu/carry/drafter --prompts bench/gpu/carry/eval_prompts.jsonl --baselines fast
       --dtype float32 --no-progress)
have_kinds() { [[ -f bench/gpu/carry/adapter/dflash.json && -f bench/gpu/carry/drafter/config.json ]]; }

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    mkdir -p "$WHEELS"
    pip wheel --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8
    pip download --no-deps -d "$WHEELS" peft==0.21.2 transformers==5.24.0 hjson==3.1.0 \
        pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 \
        datasets==5.2.0 dill==0.4.1
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" pydantic-core==2.46.4 \
        regex==2026.5.9 multiprocess==0.70.19
    ls -la "$WHEELS"; du -sh "$WHEELS"
    exit 0
fi

if [[ "${1:-}" == "--prepare-spec-decode" ]]; then
    set -e
    workdir="${2:?usage: run.sh --prepare-spec-decode DEMO_WORKDIR}"
    target=$(python3 -c "from dflash_ds.recipes.tiny_target import default_tiny_target_dir; print(default_tiny_target_dir())")
    adapter=$(ls -d "$workdir"/run/adapter 2>/dev/null || true)
    [[ -f "$adapter/dflash.json" ]] || { echo "no trained adapter at $workdir/run/adapter (run dflash-ds demo)" >&2; exit 2; }
    rm -rf bench/gpu/carry && mkdir -p bench/gpu/carry
    cp -r "$target" bench/gpu/carry/target
    cp -r "$adapter" bench/gpu/carry/adapter
    cp "$target/data/eval_prompts.jsonl" bench/gpu/carry/eval_prompts.jsonl
    if [[ -f "$workdir/run_dflash/drafter/config.json" ]]; then  # the standalone drafter, for the kinds parts
        cp -r "$workdir/run_dflash/drafter" bench/gpu/carry/drafter
    else
        echo "no standalone drafter at $workdir/run_dflash/drafter: the kinds parts will be skipped" >&2
    fi
    du -sh bench/gpu/carry
    exit 0
fi

if [[ "${1:-}" == "--spec-decode-cpu-smoke" ]]; then
    # the --spec-decode parts' code paths (eager and compiled, both loops) at a tiny random shape on the CPU
    set -e
    for c in none compile; do
        python3 bench/spec_decode.py --threads 1 --repeats 1 --fwd-repeats 3 --num-prompts 2 --max-new-tokens 16 \
            --no-tiny-cache --hidden 64 --layers 2 --heads 2 --kv-heads 1 --head-dim 32 --intermediate 128 --vocab 512 \
            --block-sizes 4 8 --compile "$c" --out "${OUT:-/tmp}/spec_decode_smoke_$c.json"
        if have_kinds; then  # the kinds parts' command, on the CPU, 2 prompts
            "${kinds[@]}" --device cpu --limit 2 --max-new-tokens 16 --repeats 1 --compile "$c" \
                --report "${OUT:-/tmp}/eval_kinds_smoke_$c.json"
        else
            echo "run.sh: no adapter and drafter in bench/gpu/carry: the kinds parts' command not smoke-tested"
        fi
    done
    exit 0
fi

if [[ "${1:-}" == "--cpu-smoke" ]]; then
    shift
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "== checking that the carried wheels install for CPython 3.12 / manylinux x86-64 (dry run)"
        python3 -m pip install -q --dry-run --no-index --no-deps --ignore-installed --only-binary=:all: \
            --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
            --target /tmp/gpu_bench_site_check "$WHEELS"/*.whl || { echo "wheel set does not resolve" >&2; exit 4; }
        echo "   ok: $(ls "$WHEELS"/*.whl | wc -l) wheels"
    else
        echo "== no wheels in $WHEELS (bash bench/gpu/run.sh --prepare); skipping the wheel check"
    fi
    export PYTHONUNBUFFERED=1
    exec python3 bench/gpu/gpu_bench.py --cpu-smoke --out "${OUT:-/tmp}/gpu_bench_smoke.json" "$@"
fi

smoke=""
SMOKE_KILL_AFTER_S=20  # the outer timeout's SIGINT-to-SIGKILL grace
SMOKE_SLACK_S=50       # smoke.py's budget ends this long before the script must: cut the last command, report
# smoke_limits LEFT: "OUTER_TIMEOUT SMOKE_BUDGET" for LEFT seconds of --budget-s still unspent
smoke_limits() { echo "$(( $1 - SMOKE_KILL_AFTER_S )) $(( $1 - SMOKE_SLACK_S ))"; }
if [[ "${1:-}" == "--smoke" ]]; then
    shift
    smoke=1
    smoke_device=cuda prev="" budget_s="" args=()
    for a in "$@"; do  # --budget-s is run.sh's own; the rest goes to smoke.py
        if [[ "$prev" == --budget-s ]]; then budget_s=$a; prev=""; continue; fi
        if [[ "$a" == --budget-s ]]; then prev=$a; continue; fi
        if [[ "$a" == --budget-s=* ]]; then budget_s=${a#--budget-s=}; prev=""; continue; fi
        [[ "$prev" == --device ]] && smoke_device=$a
        [[ "$a" == --device=* ]] && smoke_device=${a#--device=}
        prev=$a
        args+=("$a")
    done
    [[ "$prev" == --budget-s ]] && { echo "run.sh: --budget-s needs a number of seconds" >&2; exit 2; }
    if [[ -n "$budget_s" && ! "$budget_s" =~ ^[0-9]+$ ]]; then
        echo "run.sh: --budget-s takes whole seconds, not '$budget_s'" >&2; exit 2
    fi
    set -- ${args[@]+"${args[@]}"}  # (an empty array is unbound to bash < 4.4 under set -u)
    if [[ "$smoke_device" == cpu ]]; then  # anywhere, with the local Python (PYTHON, default python3)
        export PYTHONUNBUFFERED=1
        if [[ -z "$budget_s" ]]; then  # smoke.py's own budget (what CI runs)
            exec "${PYTHON:-python3}" bench/gpu/smoke.py "$@"
        fi
        read -r outer smoke_budget <<<"$(smoke_limits $(( budget_s - SECONDS )))"
        exec timeout --signal=INT --kill-after="$SMOKE_KILL_AFTER_S" "$outer" "${PYTHON:-python3}" bench/gpu/smoke.py \
            --time-budget-s "$smoke_budget" "$@"
    fi
    budget_s=${budget_s:-420}  # the whole device call, wheel install included: 7 minutes
fi

# ---- on the lent GPU machine: fail fast and clearly
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "run.sh: nvidia-smi not found: this is not a GPU machine (use $([[ -n "$smoke" ]] && echo \
          "--smoke --device cpu" || echo --cpu-smoke) to test the code path)" >&2
    exit 3
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem --format=csv || exit 3
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "run.sh: no wheels under $WHEELS: run 'bash bench/gpu/run.sh --prepare' on the dev machine and pass" \
         "carry=[\"bench/gpu/wheels\"] to the device call" >&2
    exit 2
fi
install_start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo "run.sh: wheel install failed" >&2; exit 4; }
echo "run.sh: wheel install took $(( SECONDS - install_start )) s"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
python3 - <<'EOF' || exit 3
import torch, transformers, peft
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}")
try:  # the trainer's data pipeline (--smoke); not needed by the benchmarks
    import datasets, pyarrow
    print(f"datasets {datasets.__version__}, pyarrow {pyarrow.__version__}")
except Exception as exc:
    print(f"run.sh: WARNING: datasets does not import ({type(exc).__name__}: {exc}); training will fail")
if not torch.cuda.is_available():
    raise SystemExit("run.sh: torch sees no CUDA device")
print("device:", torch.cuda.get_device_name(0))
try:  # not fatal: gpu_bench.py records a failed DeepSpeed case and measures the rest
    import deepspeed
    print(f"deepspeed {deepspeed.__version__}")
except Exception as exc:
    print(f"run.sh: WARNING: deepspeed does not import ({type(exc).__name__}: {exc}); its case will fail")
EOF
OUTDIR="${OUT:-bench/results}"
mkdir -p "$OUTDIR"
if [[ -n "$smoke" ]]; then
    # what is left of --budget-s after what this script has spent so far (nvidia-smi, the wheel install, the import
    # check: measured, SECONDS counts from the script's start) goes to the checks, so the call ends within it
    left=$(( budget_s - SECONDS ))
    read -r outer smoke_budget <<<"$(smoke_limits "$left")"
    if (( left < 60 )); then
        echo "run.sh: ${SECONDS} s of --budget-s ${budget_s} spent before the smoke (wheel install); $left s left," \
             "too few for its checks (raise --budget-s, keeping the call's timeout_s above it and under 480)" >&2
        exit 5
    fi
    echo "run.sh: --budget-s $budget_s: ${SECONDS} s spent before the smoke; smoke.py --time-budget-s $smoke_budget," \
         "outer timeout $outer s (+${SMOKE_KILL_AFTER_S} s to SIGKILL)"
    timeout --signal=INT --kill-after="$SMOKE_KILL_AFTER_S" "$outer" python3 bench/gpu/smoke.py --device cuda \
        --time-budget-s "$smoke_budget" --json "$OUTDIR/smoke.json" "$@" 2>&1 | tee "$OUTDIR/smoke.log"
    exit "${PIPESTATUS[0]}"
fi
if [[ "${1:-}" == "--spec-decode" ]]; then
    shift
    # parts, in order (SPEC_DECODE_PARTS, default "1p7b 1p7b_compiled tiny", at most 590 s;
    # a second call with SPEC_DECODE_PARTS="8b 8b_compiled" measures the 8B shape, one with "kinds kinds_compiled"
    # the two drafter kinds); every part but kinds measures the
    # AR step, draft, verify and fused-step forwards and runs AR, the two-forward and the fused loop end to end:
    #   1p7b           Qwen3-1.7B's shape, bf16, random weights and a random adapter (tau near 1: the bound is a
    #                  slowdown; the point is how close each loop comes to it and what one forward costs)
    #   1p7b_compiled  the same with --compile compile (static cache, torch.compile mode reduce-overhead: CUDA graphs)
    #   8b, 8b_compiled  Qwen3-8B's shape, eager / compiled, 1 prompt x 32 tokens (forward costs are the point)
    #   tiny           the demo's trained adapter on its tiny target (bench/gpu/carry), fp32, held-out prompts
    #   tiny_compiled  the same, compiled
    #   1p7b_fp32      the 1p7b case in fp32, 1 round: are the outputs equal to AR when bf16 rounding is out of the way?
    #   kinds          the demo's two trained drafters (LoRA adapter, standalone drafter: bench/gpu/carry) side by side
    #                  in one `dflash-ds eval` on the GPU with prompt lookup and AR: the README's equal-time table's
    #                  decoding columns (tau, acceptance by position, speedup, parameters); eval_kinds.json
    #   kinds_compiled the same with --compile compile (the target's forwards on a static cache, CUDA graphs)
    shape=(--hidden 2048 --layers 28 --heads 16 --kv-heads 8 --head-dim 128 --intermediate 6144 --vocab 151936
           --adapter-std 0.01 --no-tiny-cache --num-prompts 2 --prompt-len 256 --max-new-tokens 64)
    shape8b=(--hidden 4096 --layers 36 --heads 32 --kv-heads 8 --head-dim 128 --intermediate 12288 --vocab 151936
             --adapter-std 0.01 --no-tiny-cache --num-prompts 1 --prompt-len 256 --max-new-tokens 32 --block-sizes 8 16)
    tiny=(--model-path bench/gpu/carry/target --adapter bench/gpu/carry/adapter --prompts bench/gpu/carry/eval_prompts.jsonl
          --num-prompts 16 --max-new-tokens 96 --block-sizes 4 8)
    rc=0
    {
        for part in ${SPEC_DECODE_PARTS:-1p7b 1p7b_compiled tiny}; do
            echo "== spec_decode part $part"
            case "$part" in
                1p7b) timeout --signal=INT 200 python3 bench/spec_decode.py --device cuda --dtype bfloat16 \
                          "${shape[@]}" --repeats 2 --fwd-repeats 20 --out "$OUTDIR/spec_decode_1p7b.json" || rc=$? ;;
                1p7b_compiled) timeout --signal=INT 240 python3 bench/spec_decode.py --device cuda --dtype bfloat16 \
                          "${shape[@]}" --repeats 2 --fwd-repeats 20 --compile compile \
                          --out "$OUTDIR/spec_decode_1p7b_compiled.json" || rc=$? ;;
                8b|8b_compiled) timeout --signal=INT 240 python3 bench/spec_decode.py --device cuda --dtype bfloat16 \
                          "${shape8b[@]}" --repeats 1 --fwd-repeats 10 \
                          --compile "$([[ $part == 8b ]] && echo none || echo compile)" \
                          --out "$OUTDIR/spec_decode_$part.json" || rc=$? ;;
                1p7b_fp32) timeout --signal=INT 150 python3 bench/spec_decode.py --device cuda --dtype float32 \
                          "${shape[@]}" --repeats 1 --fwd-repeats 10 --out "$OUTDIR/spec_decode_1p7b_fp32.json" \
                          || rc=$? ;;
                tiny|tiny_compiled) if [[ -f bench/gpu/carry/adapter/dflash.json ]]; then
                          timeout --signal=INT 150 python3 bench/spec_decode.py --device cuda --dtype float32 "${tiny[@]}" \
                              --compile "$([[ $part == tiny ]] && echo none || echo compile)" \
                              --repeats 2 --out "$OUTDIR/spec_decode_$part.json" || rc=$?
                      else
                          echo "run.sh: no bench/gpu/carry/adapter: skipping part $part (see --prepare-spec-decode)"
                      fi ;;
                kinds|kinds_compiled) if have_kinds; then
                          timeout --signal=INT 200 "${kinds[@]}" --device cuda --limit 16 --max-new-tokens 96 \
                              --repeats 3 --compile "$([[ $part == kinds ]] && echo none || echo compile)" \
                              --report "$OUTDIR/eval_$part.json" || rc=$?
                      else
                          echo "run.sh: no adapter and drafter in bench/gpu/carry: skipping part $part (see --prepare-spec-decode)"
                      fi ;;
                *) echo "run.sh: unknown SPEC_DECODE_PARTS entry '$part' (1p7b, 1p7b_compiled, 8b, 8b_compiled," \
                        "tiny, tiny_compiled, 1p7b_fp32, kinds, kinds_compiled)" >&2; rc=2 ;;
            esac
        done
        exit "$rc"
    } 2>&1 | tee "$OUTDIR/spec_decode.log"
    exit "${PIPESTATUS[0]}"
fi
# hard stop at 470 s: the issue's limit is 8 minutes; gpu_bench.py starts no new case after --time-budget-s (420)
timeout --signal=INT --kill-after=20 470 python3 bench/gpu/gpu_bench.py --out "$OUTDIR/gpu_bench.json" "$@" \
    2>&1 | tee "$OUTDIR/gpu_bench.log"
exit "${PIPESTATUS[0]}"
