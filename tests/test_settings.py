"""Settings: one dataclass field per setting, command-line flags generated from the fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from dflash_ds.blocks import BlockConfig
from dflash_ds.config import OptimConfig, TrainConfig, build_parser, parse_train_args
from dflash_ds.data import DataConfig
from dflash_ds.evaluate import build_parser as eval_parser, EvalConfig
from dflash_ds.lora import LoRAConfig
from dflash_ds.loss import LossConfig
from dflash_ds.settings import add_flags, flag_name, from_args, setting
from dflash_ds.kinds import FusedConfig

REQUIRED = ["--model-path", "m", "--output-dir", "o", "--train-data", "d.jsonl"]


def test_flag_defaults_are_the_dataclass_defaults():
    """A default lives in one place: parsing no optional flag gives the components' own defaults (the CLI once
    said kl_weight 1.0 where LossConfig said 0.0)."""
    parsed = parse_train_args(REQUIRED)
    assert parsed == TrainConfig(model_path="m", output_dir="o", data=DataConfig(paths=["d.jsonl"]))
    assert parsed.loss == LossConfig() and parsed.loss.kl_weight == 1.0
    assert parsed.blocks == BlockConfig() and parsed.lora == LoRAConfig() and parsed.optim == OptimConfig()


@pytest.mark.parametrize("component", [BlockConfig, LossConfig, LoRAConfig, DataConfig, OptimConfig])
def test_every_component_field_is_a_train_flag(component):
    help_text = build_parser().format_help()
    for f in dataclasses.fields(component):
        if f.metadata.get("cli", True):
            assert flag_name(f) in help_text, f.name


def test_eval_flags_come_from_eval_config():
    help_text = eval_parser().format_help()
    for cls in (EvalConfig, FusedConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True) and not dataclasses.is_dataclass(f.type):
                assert flag_name(f) in help_text, f.name
    args = eval_parser().parse_args(["--model-path", "m", "--adapter", "a", "--prompts", "p", "--report", "r",
                                     "--fused-groups", "all", "--loop", "fused", "--max-new-tokens", "7"])
    cfg = from_args(EvalConfig, args, "decoding.")
    assert cfg == EvalConfig(loop="fused", max_new_tokens=7, fused=FusedConfig(groups=None))
    args = eval_parser().parse_args(["--model-path", "m", "--adapter", "a", "--prompts", "p", "--report", "r",
                                     "--fused-groups", "2", "--fused-reject-mismatch"])
    assert from_args(EvalConfig, args, "decoding.").fused == FusedConfig(groups=2, reject_mismatch=True)


def test_types_parse_from_their_annotations():
    cfg = parse_train_args(REQUIRED + ["--gamma", "none", "--context-ratio", "0.1,0.3", "--lora-targets", "q_proj",
                                       "v_proj", "--gradient-checkpointing", "--loss-chunk-size", "7",
                                       "--deepspeed-config", "x.json", "--local_rank=1", "--train-data", "a", "b"])
    assert cfg.blocks.gamma is None and cfg.blocks.context_ratio == (0.1, 0.3)
    assert cfg.lora.target_modules == ("q_proj", "v_proj") and cfg.gradient_checkpointing
    assert cfg.loss.chunk_size == 7 and cfg.deepspeed_config == "x.json" and cfg.local_rank == 1
    assert cfg.data.paths == ["a", "b"]


def test_bad_values_name_their_flag():
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        parse_train_args(REQUIRED + ["--kl-type", "js"])
    with pytest.raises(ValueError, match="--kl-type must be one of forward/reverse/tvd"):
        LossConfig(kl_type="js")
    with pytest.raises(ValueError, match="--lora-scope"):
        LoRAConfig(scope="some")
    with pytest.raises(ValueError, match="--block-size must be >= 2"):
        parse_train_args(REQUIRED + ["--block-size", "1"])


def test_a_new_field_is_a_new_flag():
    """What the README's "Adding a setting" note promises: one field, and the flag exists with its default."""

    @dataclasses.dataclass
    class Extended(LossConfig):
        label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy")

    parser = argparse.ArgumentParser()
    add_flags(parser, Extended)
    assert from_args(Extended, parser.parse_args([])).label_smoothing == 0.0
    parsed = from_args(Extended, parser.parse_args(["--label-smoothing", "0.1", "--kl-weight", "0.5"]))
    assert parsed.label_smoothing == 0.1 and parsed.kl_weight == 0.5


def test_optional_str_settings_take_none_on_the_command_line():
    """``str | None`` settings read ``none`` as None, as ``int | None`` ones do: a path set earlier on a command line
    (a wrapper script's default) can be unset again (it used to give the string "none": resume from a directory
    named none)."""
    cfg = parse_train_args(REQUIRED + ["--resume", "auto", "--eval-prompts", "p.jsonl", "--deepspeed_config", "x.json",
                                       "--resume", "none", "--eval-prompts", "None", "--deepspeed-config", "none"])
    assert (cfg.resume, cfg.eval_prompts, cfg.deepspeed_config) == (None, None, None)
    assert parse_train_args(REQUIRED + ["--resume", "auto"]).resume == "auto"  # any other text is kept as given


def test_switches_come_in_pairs_and_old_ones_still_turn_on():
    """Every bool setting is ``--x``/``--no-x``; the switches that default to off work as they did, on both parsers."""
    assert parse_train_args(REQUIRED + ["--gradient-checkpointing"]).gradient_checkpointing is True
    off = parse_train_args(REQUIRED + ["--gradient-checkpointing", "--no-gradient-checkpointing"])
    assert off.gradient_checkpointing is False
    base = ["--model-path", "m", "--adapter", "a", "--prompts", "p", "--report", "r"]
    for extra, expected in (([], False), (["--fused-reject-mismatch"], True),
                            (["--fused-reject-mismatch", "--no-fused-reject-mismatch"], False)):
        cfg = from_args(EvalConfig, eval_parser().parse_args(base + extra), "decoding.")
        assert cfg.fused.reject_mismatch is expected, extra
    assert "--no-gradient-checkpointing" in build_parser().format_help()


def test_a_switch_that_defaults_to_on_can_be_turned_off():
    """A bool setting whose default is True: a store_true switch could only set it True again; ``--no-x`` turns it
    off, and the help says it is on by default. Built on a component of the real train parser, as a new setting
    would be (the README's "Adding a setting")."""

    @dataclasses.dataclass
    class Extended(LossConfig):
        fused_loss: bool = setting(True, "fused lm_head + loss")

    parser = argparse.ArgumentParser()
    add_flags(parser, Extended)
    assert from_args(Extended, parser.parse_args([])).fused_loss is True
    assert from_args(Extended, parser.parse_args(["--no-fused-loss"])).fused_loss is False
    assert from_args(Extended, parser.parse_args(["--fused-loss"])).fused_loss is True
    assert "fused lm_head + loss (default on)" in " ".join(parser.format_help().split())
