"""The demo as a test: a reduced run (small target, few steps) through the real pipeline: self-distillation,
2-rank ZeRO-3 training of both drafter kinds through the deepspeed launcher, speculative decoding of both side by
side against the baselines."""

import json
from pathlib import Path

import pytest

from dflash_ds.recipes.tiny_target import TinyTargetConfig, build_tiny_target

SMALL_TARGET = TinyTargetConfig(
    vocab_size=384, max_functions=300, eval_fraction=0.2, hidden_size=64, num_layers=2, num_heads=2,
    num_kv_heads=2, head_dim=32, intermediate_size=128, seq_len=96, batch_size=8, steps=40,
    max_eval_tokens=2048, num_samples=1,
)


@pytest.mark.slow
def test_reduced_demo_trains_and_decodes_losslessly(tmp_path, capsys, monkeypatch):
    """Also without ``deepspeed`` on PATH (a virtual environment used without activating it): the demo launches
    DeepSpeed from its own interpreter."""
    import importlib.util
    import shutil

    from dflash_ds.recipes.demo import main

    monkeypatch.setenv("PATH", _without_deepspeed_on_path())
    assert shutil.which("deepspeed") is None
    target = tmp_path / "target"
    build_tiny_target(target, SMALL_TARGET, progress=False)
    shm_buffers = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    rc = main([
        "--workdir", str(tmp_path / "work"), "--target", str(target), "--steps", "8", "--dflash-steps", "6",
        "--num-train", "48",
        "--distill-tokens", "24", "--block-size", "4", "--max-length", "96", "--micro-batch-size", "2",
        "--lr", "5e-3", "--eval-prompts", "3", "--max-new-tokens", "16", "--repeats", "1",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    summary = json.loads((tmp_path / "work" / "demo_report.json").read_text())
    assert list(summary["drafters"]) == ["lora", "dflash"]  # the tiny recipe's default: both kinds
    for kind, d in summary["drafters"].items():
        assert d["last_loss"] < d["first_loss"], f"{kind}: training did not lower the loss"
        assert d["greedy_match"] is True and d["tau"] >= 1 and d["train_s"] > 0, (kind, d)
        assert d["steps"] == {"lora": 8, "dflash": 6}[kind], (kind, d)  # --dflash-steps reached the trainer
    assert summary["greedy_match"] is True
    # DeepSpeed's CPU shm all-reduce leaves 69 MB a rank in /dev/shm unless the trainer unlinks it
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_buffers
    assert summary["tau"] > summary["floor_tau"], summary  # the trained adapter drafts better than an untrained one
    assert "prompt lookup" in out and "untrained" in out.lower()  # the table shows the baselines
    assert "[dflash, 1 draft layer" in out and "[lora" in out, out[-3000:]  # one row per kind, saying which
    work = tmp_path / "work"
    assert (work / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((work / "run_dflash" / "drafter" / "config.json").read_text())["architectures"] == [
        "DFlashDraftModel"]
    assert any((work / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert any((work / "run_dflash" / "tensorboard").rglob("events.out.tfevents.*"))
    if importlib.util.find_spec("matplotlib") is not None:  # the plots, by default, their paths printed at the end
        pngs = sorted(str(p) for p in (tmp_path / "work" / "plots").glob("*.png"))
        assert pngs and sorted(summary["plots"]) == pngs, summary["plots"]
        assert all(f"plot: {p}" in out for p in pngs)


def test_recipe_flags_default_per_target_and_bad_values_name_their_flag(capsys):
    from dflash_ds.recipes.demo import RECIPES, parse_args

    smol = parse_args(["--target", "smollm2"])
    assert (smol.num_anchors, smol.loop, smol.floor_tokens) == (None, "two_forward", 32) == (
        RECIPES["smollm2"].num_anchors, RECIPES["smollm2"].loop, RECIPES["smollm2"].floor_tokens)
    assert smol.drafters == ["lora"]
    tiny = parse_args([])
    assert (tiny.num_anchors, tiny.loop, tiny.floor_tokens, tiny.drafters) == (None, "auto", None, ["lora", "dflash"])
    assert parse_args(["--target", "smollm2", "--num-anchors", "16", "--loop", "both"]).num_anchors == 16
    assert parse_args(["--target", "smollm2", "--drafters", "dflash,lora"]).drafters == ["dflash", "lora"]
    for flag, value in (("--loop", "fast"), ("--truncated", "maybe"), ("--drafters", "eagle"),
                        ("--drafters", "lora,lora"), ("--drafters", "")):
        with pytest.raises(SystemExit):
            parse_args([flag, value])
        assert flag in capsys.readouterr().err


def test_recipe_flags_reach_the_trainer_and_the_eval(tmp_path, monkeypatch, capsys):
    """--num-anchors goes to the training command only when set, --draft-layers to the standalone kind's only;
    --loop, --floor-tokens and every drafter to the eval, in this process or under the launcher."""
    from dflash_ds import evaluate
    from dflash_ds.evaluate import cli
    from dflash_ds.recipes import demo

    commands = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    for argv, anchors in ((["--target", "smollm2"], None), (["--target", "smollm2", "--num-anchors", "12"], "12")):
        commands.clear()
        demo.launch_training(tmp_path, tmp_path / "d.jsonl", tmp_path / "run", "lora", demo.parse_args(argv))
        cmd = commands[0]
        assert (cmd[cmd.index("--num-anchors") + 1] if "--num-anchors" in cmd else None) == anchors
        assert cmd[cmd.index("--group-by-length") + 1] == "32"
        assert cmd[cmd.index("--drafter") + 1] == "lora" and "--draft-layers" not in cmd
    commands.clear()
    demo.launch_training(tmp_path, tmp_path / "d.jsonl", tmp_path / "run", "dflash",
                         demo.parse_args(["--draft-layers", "2"]))
    cmd = commands[0]
    assert cmd[cmd.index("--group-by-length") + 1] == "0"
    assert (cmd[cmd.index("--drafter") + 1], cmd[cmd.index("--draft-layers") + 1]) == ("dflash", "2")
    # the tiny recipe trains the standalone kind for its own step count (about the LoRA kind's time), else --steps
    for argv, kind, steps in (([], "dflash", "500"), ([], "lora", "200"), (["--dflash-steps", "0"], "dflash", "200"),
                              (["--steps", "9", "--dflash-steps", "7"], "dflash", "7")):
        commands.clear()
        demo.launch_training(tmp_path, tmp_path / "d.jsonl", tmp_path / "run", kind, demo.parse_args(argv))
        assert commands[0][commands[0].index("--max-steps") + 1] == steps, (argv, kind)
    # and SmolLM2's its own learning rate (full layers, not a low-rank adapter), else --lr
    for argv, kind, lr in ((["--target", "smollm2"], "dflash", "0.0006"), (["--target", "smollm2"], "lora", "0.003"),
                           ([], "dflash", "0.003"), (["--target", "smollm2", "--dflash-lr", "0"], "dflash", "0.003")):
        commands.clear()
        demo.launch_training(tmp_path, tmp_path / "d.jsonl", tmp_path / "run", kind, demo.parse_args(argv))
        assert commands[0][commands[0].index("--lr") + 1] == lr, (argv, kind)
    # SmolLM2's standalone drafter drafts over 8,192 answer tokens (measured: docs/benchmarks.md); the tiny one and
    # the LoRA kind over the whole vocabulary
    for argv, kind, vocab in ((["--target", "smollm2"], "dflash", "8192"), (["--target", "smollm2"], "lora", None),
                              ([], "dflash", None), (["--target", "smollm2", "--draft-vocab", "0"], "dflash", None),
                              (["--draft-vocab", "64"], "dflash", "64")):
        commands.clear()
        demo.launch_training(tmp_path, tmp_path / "d.jsonl", tmp_path / "run", kind, demo.parse_args(argv))
        cmd = commands[-1]
        assert (cmd[cmd.index("--draft-vocab") + 1] if "--draft-vocab" in cmd else None) == vocab, (argv, kind)
    # and SmolLM2's starts from random weights (measured better than the copy); the tiny one from the copy
    for argv, init in ((["--target", "smollm2"], "random"), ([], "target"), (["--draft-init", "random"], "random")):
        commands.clear()
        demo.launch_training(tmp_path, tmp_path / "d.jsonl", tmp_path / "run", "dflash", demo.parse_args(argv))
        assert commands[-1][commands[-1].index("--draft-init") + 1] == init, argv
    with pytest.raises(SystemExit):
        demo.parse_args(["--draft-init", "copy"])
    assert "--draft-init must be one of target/random, got 'copy'" in capsys.readouterr().err

    drafters = [tmp_path / "run" / "adapter", tmp_path / "run_dflash" / "drafter"]
    report = tmp_path / "eval_report.json"
    ran = []

    def eval_main(argv):
        ran.append(argv)
        report.write_text('{"tau": 2.0}')
        return 0

    monkeypatch.setattr(cli, "main", eval_main)
    args = demo.parse_args(["--eval-ranks", "1", "--floor-tokens", "7"])
    assert demo.evaluate(tmp_path, drafters, tmp_path / "p.jsonl", report, args) == {"tau": 2.0}
    argv = ran[0]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--drafter"] == [str(p) for p in drafters]
    assert (argv[argv.index("--loop") + 1], argv[argv.index("--floor-tokens") + 1]) == ("auto", "7")
    evaluate.build_parser().parse_args(argv)  # flags the eval takes
    demo.evaluate(tmp_path, drafters[:1], tmp_path / "p.jsonl", report,
                  demo.parse_args(["--target", "smollm2", "--floor-tokens", "0", "--loop", "both", "--eval-ranks", "1"]))
    assert "--floor-tokens" not in ran[1] and ran[1][ran[1].index("--loop") + 1] == "both"
    monkeypatch.setattr(cli, "main", lambda argv: 2)
    with pytest.raises(RuntimeError, match="dflash-ds eval"):
        demo.evaluate(tmp_path, drafters, tmp_path / "p.jsonl", report, args)

    # smollm2's default: dflash-ds eval under the launcher, two ranks of one thread, the same settings as flags
    def launched(cmd, **kw):
        commands.append(cmd)
        Path(cmd[cmd.index("--report") + 1]).write_text('{"tau": 2.5}')

    monkeypatch.setattr(demo.subprocess, "run", launched)
    commands.clear()
    assert demo.evaluate(tmp_path, drafters[:1], tmp_path / "p.jsonl", report,
                         demo.parse_args(["--target", "smollm2"])) == {"tau": 2.5}
    cmd = commands[0]
    # the deepspeed launcher adds --local_rank=R to the module's flags: the eval parser must take it
    evaluate.build_parser().parse_args([*cmd[cmd.index("dflash_ds.evaluate") + 1 :], "--local_rank=1"])
    flags = {f: cmd[cmd.index(f) + 1] for f in ("--num_gpus", "--module", "--threads", "--loop", "--floor-tokens",
                                                 "--max-new-tokens", "--limit", "--report", "--drafter")}
    assert flags == {"--num_gpus": "2", "--module": "dflash_ds.evaluate", "--threads": "1", "--loop": "two_forward",
                     "--floor-tokens": "32", "--max-new-tokens": "128", "--limit": "16", "--report": str(report),
                     "--drafter": str(drafters[0])}


def test_demo_writes_plots_by_default_and_goes_on_without_matplotlib(tmp_path, monkeypatch, capsys):
    """The demo's plots (the pipeline's stages stubbed): WORKDIR/plots by default, their paths at the end of the summary
    and in demo_report.json; --no-plots draws none; without matplotlib one line says how to install it and the demo
    goes on; a plot that fails to draw is one line, never the demo's failure."""
    import sys

    from dflash_ds import plots
    from dflash_ds.recipes import demo

    row = {"tau": 2.0, "speedup": 1.5, "greedy_match": True}
    report = {**row, "baselines": {}, "drafters": {"drafter": row, "drafter_2": row}}
    target, work = tmp_path / "target", tmp_path / "work"
    (target / "data").mkdir(parents=True)

    def train(target, data, run_dir, kind, args):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text('{"loss": 3.0}\n{"loss": 2.0}\n')

    drawn = []

    def write_plots(rep, out_dir):
        drawn.append((rep, out_dir))
        return [out_dir / "acceptance_by_position.png", out_dir / "speedup.png"]

    monkeypatch.setattr(demo, "deepspeed_launcher", lambda: [])
    monkeypatch.setattr(demo, "prepare_data", lambda *a: tmp_path / "data.jsonl")
    monkeypatch.setattr(demo, "launch_training", train)
    monkeypatch.setattr(demo, "evaluate", lambda *a: report)
    monkeypatch.setattr(plots, "require_matplotlib", lambda: None)
    monkeypatch.setattr(plots, "write_plots", write_plots)
    argv = ["--workdir", str(work), "--target", str(target)]

    assert demo.main(argv) == 0
    assert drawn == [(report, work / "plots")]
    paths = [str(work / "plots" / "acceptance_by_position.png"), str(work / "plots" / "speedup.png")]
    assert capsys.readouterr().out.splitlines()[-2:] == [f"plot: {p}" for p in paths]
    assert json.loads((work / "demo_report.json").read_text())["plots"] == paths

    drawn.clear()
    assert demo.main([*argv, "--no-plots"]) == 0
    assert drawn == [] and "plot: " not in capsys.readouterr().out
    assert json.loads((work / "demo_report.json").read_text())["plots"] == []

    monkeypatch.undo()  # the real require_matplotlib, with matplotlib made unimportable
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    for name, value in (("deepspeed_launcher", lambda: []), ("prepare_data", lambda *a: tmp_path / "data.jsonl"),
                        ("launch_training", train), ("evaluate", lambda *a: report)):
        monkeypatch.setattr(demo, name, value)
    monkeypatch.setattr(plots, "write_plots", write_plots)
    assert demo.main(argv) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "matplotlib" in line]
    assert drawn == [] and len(said) == 1 and "pip install 'dflash-ds[plots]'" in said[0], said

    monkeypatch.setattr(plots, "require_matplotlib", lambda: None)
    monkeypatch.setattr(plots, "write_plots", lambda *a: 1 / 0)
    assert demo.main(argv) == 0
    assert "no plots: ZeroDivisionError" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Launchers: the demo's, launch/*.sh and the README's cluster commands work as printed


def _without_deepspeed_on_path() -> str:
    """PATH less every directory that holds a ``deepspeed`` script (an environment that is not activated)."""
    import os

    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "deepspeed").exists()]
    return os.pathsep.join(dirs)


def test_demo_launches_deepspeed_from_its_own_interpreter_without_deepspeed_on_path(tmp_path, monkeypatch):
    """An unactivated venv has no ``deepspeed`` on PATH: the demo runs the launcher as ``python -m`` from the
    interpreter it runs in, for training, regeneration and eval alike."""
    import shutil
    import sys

    from dflash_ds.recipes import demo, launcher

    monkeypatch.setenv("PATH", _without_deepspeed_on_path())
    assert shutil.which("deepspeed") is None
    assert launcher.deepspeed_launcher() == [sys.executable, "-m", "deepspeed.launcher.runner"]
    commands = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    demo.launch_training(tmp_path, tmp_path / "d.jsonl", tmp_path / "run", "lora", demo.parse_args([]))
    args = demo.parse_args(["--regen-ranks", "2"])
    demo.prepare_data(tmp_path, tmp_path / "prompts.jsonl", tmp_path, args)
    for cmd in commands:
        assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"], cmd
    assert [c[c.index("--module") + 1] for c in commands] == ["dflash_ds.train", "dflash_ds.regenerate"]


def test_demo_without_deepspeed_says_what_to_do_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    from dflash_ds.recipes import demo
    from dflash_ds.recipes import tiny_target as tiny

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    monkeypatch.setattr(tiny, "ensure_tiny_target", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    assert demo.main(["--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "dflash-ds demo: error: DeepSpeed is not installed for this Python" in err
    assert "activate" in err and "pip install -e '.[cpu]'" in err
    assert "Traceback" not in err


def _stub_bin(tmp_path, gpus: int | None = None) -> tuple[Path, Path]:
    """A ``deepspeed`` that prints its arguments and DS_ACCELERATOR, and a stand-in ``torch`` package whose
    ``cuda.device_count()`` is ``FAKE_GPUS`` (so a CPU machine can play one with GPUs)."""
    import stat

    bin_dir, fake = tmp_path / "bin", tmp_path / "fake_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        "import os\n\nclass cuda:\n    @staticmethod\n    def device_count():\n"
        "        return int(os.environ['FAKE_GPUS'])\n")
    bin_dir.mkdir()
    stub = bin_dir / "deepspeed"
    stub.write_text('#!/usr/bin/env bash\necho "DS_ACCELERATOR=${DS_ACCELERATOR:-}"\necho "ARGS $*"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return bin_dir, fake


def _run_script(script: str, env_extra: dict, cwd=None):
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "NUM_GPUS", "CUDA_VISIBLE_DEVICES")}
    env.update({"MODEL": "/m", "DATA": "/d.jsonl", "OUT": "/o", **env_extra})
    return subprocess.run(["bash", str(root / "launch" / script), "--lr", "1e-4"], cwd=cwd or root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_single_node_uses_the_gpu_count_and_two_cpu_ranks_only_without_gpus(tmp_path):
    import os
    import sys

    bin_dir, fake = _stub_bin(tmp_path)
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(fake), "PYTHON": sys.executable}
    cases = [  # (environment, expected rank flags, expected DS_ACCELERATOR seen by deepspeed)
        ({"FAKE_GPUS": "1"}, ["--num_gpus", "1"], ""),  # a 1-GPU machine: one rank (was forced to 2)
        ({"FAKE_GPUS": "8"}, ["--num_gpus", "8"], ""),
        ({"FAKE_GPUS": "2", "CUDA_VISIBLE_DEVICES": "1,3"}, [], ""),  # deepspeed maps CUDA_VISIBLE_DEVICES itself
        ({"FAKE_GPUS": "0"}, ["--num_gpus", "2"], "cpu"),  # no GPU: 2 CPU ranks, and deepspeed told so
        ({"FAKE_GPUS": "8", "DS_ACCELERATOR": "cpu"}, ["--num_gpus", "2"], "cpu"),
        ({"FAKE_GPUS": "8", "NUM_GPUS": "3"}, ["--num_gpus", "3"], ""),
    ]
    for env, ranks, accel in cases:
        proc = _run_script("single_node.sh", {**base, **env})
        assert proc.returncode == 0, (env, proc.stdout, proc.stderr)
        lines = proc.stdout.splitlines()
        assert lines[0] == f"DS_ACCELERATOR={accel}", (env, lines)
        args = lines[1].split()[1:]
        assert args[: args.index("--master_port")] == ranks, (env, args)
        assert args[args.index("--module") + 1] == "dflash_ds.train" and args[-2:] == ["--lr", "1e-4"]
        assert ["--model-path", "/m"] == args[args.index("--model-path") : args.index("--model-path") + 2]


def test_launch_scripts_fall_back_to_python_m_deepspeed_and_say_what_to_do_without_it(tmp_path):
    """No ``deepspeed`` on PATH: the scripts run ``$PYTHON -m deepspeed.launcher.runner``; when that interpreter
    cannot import deepspeed either, one line says what to do (exit 2), not 'command not found'."""
    import os
    import stat
    import sys

    _, fake = _stub_bin(tmp_path)
    py_dir = tmp_path / "py"
    py_dir.mkdir()
    python = py_dir / "python3"  # runs the real interpreter, except that the launcher only prints its arguments
    python.write_text(f'#!/usr/bin/env bash\nif [[ "$1 $2" == "-m deepspeed.launcher.runner" ]]; then\n'
                      f'  shift 2; echo "PYTHON-M-DEEPSPEED $*"; exit 0\nfi\nexec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    path = f"{py_dir}{os.pathsep}{_without_deepspeed_on_path()}"
    host = tmp_path / "hostfile"
    host.write_text("localhost slots=1\n")

    proc = _run_script("single_node.sh", {"PATH": path, "PYTHONPATH": str(fake), "FAKE_GPUS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PYTHON-M-DEEPSPEED --num_gpus 1 "), proc.stdout
    proc = _run_script("multi_node.sh", {"PATH": path, "HOSTFILE": str(host)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"PYTHON-M-DEEPSPEED --hostfile {host} --launcher pdsh "), proc.stdout

    for script in ("single_node.sh", "multi_node.sh"):
        proc = _run_script(script, {"PATH": path, "PYTHON": "false", "HOSTFILE": str(host), "FAKE_GPUS": "1"})
        assert proc.returncode == 2, (script, proc.stdout, proc.stderr)
        assert "cannot import deepspeed: activate the environment" in proc.stderr, proc.stderr
        assert proc.stdout == ""


def test_multi_node_without_a_hostfile_says_how_to_make_one(tmp_path):
    bin_dir, _ = _stub_bin(tmp_path)
    import os

    proc = _run_script("multi_node.sh", {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert "no hostfile at launch/hostfile: cp launch/hostfile.example launch/hostfile" in proc.stderr


def test_readme_cluster_commands_create_the_hostfile_they_use():
    """Every README command block that passes ``--hostfile launch/hostfile`` (or HOSTFILE=launch/hostfile) first
    copies the example there, and every launch/ path the README names exists."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    using = [b for b in blocks if re.search(r"(--hostfile |HOSTFILE=)launch/hostfile\b", b)]
    assert using, "the README's cluster commands are gone?"
    for block in using:
        copy = block.find("cp launch/hostfile.example launch/hostfile")
        first_use = re.search(r"(--hostfile |HOSTFILE=)launch/hostfile\b", block).start()
        assert 0 <= copy < first_use, block
    for path in set(re.findall(r"\blaunch/[\w./-]+", readme)) - {"launch/hostfile"}:
        assert (root / path.rstrip(".")).exists(), path
