"""The demo as a test: a reduced run (small target, few steps) through the real pipeline: self-distillation,
2-rank ZeRO-3 training through the deepspeed launcher, speculative decoding against the baselines."""

import json
from pathlib import Path

from dflash_ds.tiny import TinyTargetConfig, build_tiny_target

SMALL_TARGET = TinyTargetConfig(
    vocab_size=384, max_functions=300, eval_fraction=0.2, hidden_size=64, num_layers=2, num_heads=2,
    num_kv_heads=2, head_dim=32, intermediate_size=128, seq_len=96, batch_size=8, steps=40,
    max_eval_tokens=2048, num_samples=1,
)


def test_reduced_demo_trains_and_decodes_losslessly(tmp_path, capsys):
    from dflash_ds.demo import main

    target = tmp_path / "target"
    build_tiny_target(target, SMALL_TARGET, progress=False)
    rc = main([
        "--workdir", str(tmp_path / "work"), "--target", str(target), "--steps", "8", "--num-train", "48",
        "--distill-tokens", "24", "--block-size", "4", "--max-length", "96", "--micro-batch-size", "2",
        "--lr", "5e-3", "--eval-prompts", "3", "--max-new-tokens", "16", "--repeats", "1",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    summary = json.loads((tmp_path / "work" / "demo_report.json").read_text())
    assert summary["last_loss"] < summary["first_loss"], "training did not lower the loss"
    assert summary["greedy_match"] is True
    assert summary["tau"] > summary["floor_tau"], summary  # the trained adapter drafts better than an untrained one
    assert "prompt lookup" in out and "untrained" in out.lower()  # the table shows the baselines
    assert (tmp_path / "work" / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert any((tmp_path / "work" / "run" / "tensorboard").rglob("events.out.tfevents.*"))


def test_recipe_flags_default_per_target_and_bad_values_name_their_flag(capsys):
    import pytest

    from dflash_ds.demo import RECIPES, parse_args

    smol = parse_args(["--target", "smollm2"])
    assert (smol.num_anchors, smol.loop, smol.floor_tokens) == (None, "two_forward", 32) == (
        RECIPES["smollm2"].num_anchors, RECIPES["smollm2"].loop, RECIPES["smollm2"].floor_tokens)
    tiny = parse_args([])
    assert (tiny.num_anchors, tiny.loop, tiny.floor_tokens) == (None, "auto", None)
    assert parse_args(["--target", "smollm2", "--num-anchors", "16", "--loop", "both"]).num_anchors == 16
    for flag, value in (("--loop", "fast"), ("--truncated", "maybe")):
        with pytest.raises(SystemExit):
            parse_args([flag, value])
        assert flag in capsys.readouterr().err


def test_recipe_flags_reach_the_trainer_and_the_eval(tmp_path, monkeypatch):
    """--num-anchors goes to the training command only when set; --loop and --floor-tokens to the eval config."""
    from dflash_ds import demo, evaluate

    commands = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    for argv, anchors in ((["--target", "smollm2"], None), (["--target", "smollm2", "--num-anchors", "12"], "12")):
        commands.clear()
        demo.launch_training(tmp_path, tmp_path / "d.jsonl", tmp_path / "run", demo.parse_args(argv))
        cmd = commands[0]
        assert (cmd[cmd.index("--num-anchors") + 1] if "--num-anchors" in cmd else None) == anchors
        assert cmd[cmd.index("--group-by-length") + 1] == "32"
    commands.clear()
    demo.launch_training(tmp_path, tmp_path / "d.jsonl", tmp_path / "run", demo.parse_args([]))
    assert commands[0][commands[0].index("--group-by-length") + 1] == "0"

    configs = []
    monkeypatch.setattr(evaluate, "run_eval", lambda model, tok, meta, prompts, cfg: configs.append(cfg) or {})
    monkeypatch.setattr(evaluate, "format_table", lambda report: "")
    monkeypatch.setattr(evaluate, "load_prompts", lambda *a, **k: [])
    monkeypatch.setattr("dflash_ds.lora.load_adapter_dir", lambda *a, **k: None)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: type("M", (), {"eval": lambda self: self})())
    demo.evaluate(tmp_path, tmp_path, tmp_path, demo.parse_args(["--eval-ranks", "1", "--floor-tokens", "7"]))
    demo.evaluate(tmp_path, tmp_path, tmp_path, demo.parse_args(["--target", "smollm2", "--floor-tokens", "0",
                                                                 "--loop", "both", "--eval-ranks", "1"]))
    assert [(c.loop, c.floor_tokens) for c in configs] == [("auto", 7), ("both", None)]

    # smollm2's default: dflash-ds eval under the launcher, two ranks of one thread, the same settings as flags
    def launched(cmd, **kw):
        commands.append(cmd)
        Path(cmd[cmd.index("--report") + 1]).write_text('{"tau": 2.5}')

    monkeypatch.setattr(demo.subprocess, "run", launched)
    commands.clear()
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    assert demo.evaluate(tmp_path, adapter, tmp_path / "p.jsonl", demo.parse_args(["--target", "smollm2"])) == {"tau": 2.5}
    cmd = commands[0]
    # the deepspeed launcher adds --local_rank=R to the module's flags: the eval parser must take it
    evaluate.build_parser().parse_args([*cmd[cmd.index("dflash_ds.evaluate") + 1 :], "--local_rank=1"])
    flags = {f: cmd[cmd.index(f) + 1] for f in ("--num_gpus", "--module", "--threads", "--loop", "--floor-tokens",
                                                 "--max-new-tokens", "--limit", "--report")}
    assert flags == {"--num_gpus": "2", "--module": "dflash_ds.evaluate", "--threads": "1", "--loop": "two_forward",
                     "--floor-tokens": "32", "--max-new-tokens": "128", "--limit": "16",
                     "--report": str(tmp_path / "run" / "eval_report.json")}
