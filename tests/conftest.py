import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: multi-rank, subprocess, end-to-end or statistical runs (more than a few seconds each); "
                   "the fast subset is -m 'not slow'")


FAMILIES = ("qwen3", "llama")


def tiny_config(family: str = "qwen3", **overrides):
    """A 2-layer random config. ``llama`` is SmolLM2-shaped: tied embeddings, no q/k norms; ``qwen3`` has a separate
    lm_head and q/k norms, as Qwen3-8B; ``qwen2`` (q/k/v biases) and ``mistral`` (sliding window) also work."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kwargs = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=family == "llama",
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return {"qwen3": Qwen3Config, "llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family](**kwargs)


def tiny_qwen3_config(**overrides):
    return tiny_config("qwen3", **overrides)


def tiny_model(family: str = "qwen3", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).float().eval()


def tiny_qwen3(seed: int = 0, **overrides):
    return tiny_model("qwen3", seed, **overrides)


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


#: SmolLM2's situation in miniature: code-dataset special tokens that chat text never contains, no <|mask|>, and
#: an embedding with no spare row (so the MASK must be one of these specials).
CODE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<gh_stars>", "<file_sep>")


def write_tiny_target(path, seed: int = 0, vocab_size: int = 400, family: str = "qwen3", **overrides):
    """A from_pretrained directory: byte-level BPE tokenizer and a random tiny model. ``qwen3``: ChatML + <|mask|>;
    ``llama``: SmolLM2-like (ChatML, code specials, no <|mask|>, every embedding row used, tied lm_head)."""
    import sysconfig
    from pathlib import Path

    from dflash_ds.recipes.tokenizer import train_tokenizer

    path = Path(path)
    src = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    specials = CODE_SPECIALS if family == "llama" else None
    tokenizer = train_tokenizer([src.read_text()], vocab_size=vocab_size, special_tokens=specials)
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer), **overrides)
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
    from test_distributed import _reference_run

    return _reference_run(assets, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="session")
def regenerated(assets, tmp_path_factory):
    """Self-distillation of the reference data by one process: what every sharded regeneration must reproduce."""
    from ranks import run_ranks
    from test_distributed import ROOT, dist_env, regenerate_args

    out = tmp_path_factory.mktemp("regen") / "one.jsonl"
    proc = run_ranks(1, "dflash_ds.regenerate", regenerate_args(assets, out), dist_env(), ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
