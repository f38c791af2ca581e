# Sourced by single_node.sh and multi_node.sh (not run on its own).
#
# resolve_deepspeed sets DEEPSPEED to the launcher command: `deepspeed` when it is on PATH (an activated
# environment), else `$PYTHON -m deepspeed.launcher.runner` (what the `deepspeed` script runs: works from a virtual
# environment that is not activated, with PYTHON=/path/to/venv/bin/python), else it stops saying what to do.
PYTHON=${PYTHON:-python3}

resolve_deepspeed() {
    if command -v deepspeed >/dev/null 2>&1; then
        DEEPSPEED=(deepspeed)
    elif "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("deepspeed") is None)' \
            >/dev/null 2>&1; then
        DEEPSPEED=("$PYTHON" -m deepspeed.launcher.runner)
    else
        echo "$(basename "$0"): no 'deepspeed' on PATH, and '$PYTHON' cannot import deepspeed: activate the" \
             "environment dflash-ds is installed in (source VENV/bin/activate), or set PYTHON=VENV/bin/python" >&2
        exit 2
    fi
}
