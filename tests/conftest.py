import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)


def tiny_qwen3_config(**overrides):
    from transformers import Qwen3Config

    kwargs = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def tiny_qwen3(seed: int = 0, **overrides):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(**overrides)).float().eval()
    return model


def randomize_lora_b(model, seed: int = 1, std: float = 0.05) -> None:
    """Fresh adapters have lora_B = 0 (no effect); tests need one that changes the output."""
    from dflash_ds.lora import lora_modules

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * std)


@pytest.fixture
def model():
    return tiny_qwen3()


def write_tiny_target(path, seed: int = 0, vocab_size: int = 400, **overrides):
    """A from_pretrained directory: byte-level BPE tokenizer (ChatML + <|mask|>) and a random tiny Qwen3."""
    import json
    import sysconfig
    from pathlib import Path

    from dflash_ds.tiny import train_tokenizer

    path = Path(path)
    src = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    tokenizer = train_tokenizer([src.read_text()], vocab_size=vocab_size)
    model = tiny_qwen3(seed=seed, vocab_size=len(tokenizer), **overrides)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_conversations(path, n: int = 16, seed: int = 0):
    """JSONL conversations built from stdlib functions (user: signature, assistant: body)."""
    import json
    import random
    import sysconfig
    from pathlib import Path

    src = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            start = rng.randrange(0, len(src) - 12)
            user = "\n".join(src[start : start + 2]) or "def f():"
            assistant = "\n".join(src[start + 2 : start + 2 + rng.randrange(4, 10)]) or "    pass"
            conv = {"conversations": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
            f.write(json.dumps(conv) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# multi-rank runs (tests/test_distributed.py, tests/test_cluster.py): one tiny target and one reference run per session


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    write_tiny_target(d / "model")
    write_conversations(d / "data.jsonl", n=24)
    return d


@pytest.fixture(scope="session")
def reference(assets, tmp_path_factory):
    """One process, global batch 2 via gradient accumulation: what every parallel layout must reproduce."""
    from test_distributed import adapter, metrics, run_train

    out = tmp_path_factory.mktemp("ref")
    run_train(assets, out, nproc=1, extra=["--grad-accum", "2"])
    m = metrics(out)
    assert m[-1]["loss"] < m[0]["loss"], "training did not lower the loss: parity would prove nothing"
    b = [v for k, v in adapter(out).items() if "lora_B" in k]
    assert any(t.abs().max() > 1e-3 for t in b), "adapter did not move"
    return out


@pytest.fixture(scope="session")
def regenerated(assets, tmp_path_factory):
    """Self-distillation of the reference data by one process: what every sharded regeneration must reproduce."""
    import subprocess
    import sys

    from test_distributed import ROOT, dist_env, regenerate_args

    out = tmp_path_factory.mktemp("regen") / "one.jsonl"
    subprocess.run([sys.executable, "-m", "dflash_ds.regenerate", *regenerate_args(assets, out)], cwd=ROOT,
                   env=dist_env(), check=True, capture_output=True, timeout=300)
    return out
