import json
from pathlib import Path

import pytest
import torch

from crslight.models import loading
from crslight.models.loading import (
    DEFAULT_POLICY,
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    tiny_causal_lm,
    tiny_causal_lm_config,
)


def test_tiny_config_shape():
    config = tiny_causal_lm_config(100, pad_token_id=0)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == 100 and config.pad_token_id == 0


def test_tiny_tokenizer_is_smollm2_with_distinct_pad(tiny_tokenizer):
    assert len(tiny_tokenizer) == 49152 + 1  # SmolLM2's vocabulary and the recommendation slot token
    assert tiny_tokenizer.convert_tokens_to_ids("<|item|>") == 49152
    assert tiny_tokenizer.padding_side == "left"
    assert tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id  # masks by pad id keep the end token
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Any sci-fi film?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nAny sci-fi film?<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_lm_forward(tiny_lm, tiny_tokenizer):
    batch = tiny_tokenizer(["I loved Inception", "Hi"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # left padded
    with torch.no_grad():
        logits = tiny_lm(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tiny_tokenizer))
    assert torch.isfinite(logits).all()
    assert tiny_lm.config.pad_token_id == tiny_tokenizer.pad_token_id
    out = tiny_lm.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_tiny_causal_lm_is_seeded_and_leaves_global_rng_alone(tiny_tokenizer, tiny_lm):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model = tiny_causal_lm(tiny_tokenizer, seed=0)
    assert torch.rand(1) == before
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_lm.parameters(), strict=True))
    other = tiny_causal_lm(tiny_tokenizer, seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_resolve_model_path_passthrough(tmp_path):
    assert resolve_model_path(tmp_path) == str(tmp_path.resolve())
    assert resolve_model_path("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    minilm = Path(resolve_model_path("minilm"))
    assert json.loads((minilm / "config.json").read_text())["hidden_size"] == 384


def test_saved_tiny_model_round_trips_with_string_dtype(tiny_lm, tiny_tokenizer, tmp_path):
    tiny_lm.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(model.lm_head.weight.float(), tiny_lm.lm_head.weight.bfloat16().float())
    assert load_tokenizer(tmp_path, padding_side="right").padding_side == "right"
    with pytest.raises(ValueError):
        load_causal_lm(tmp_path, dtype="float17")
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path, padding_side="middle")


def test_minilm_backbone_encodes():
    tokenizer = load_tokenizer("minilm", padding_side="right")
    backbone = load_backbone("minilm").eval()
    batch = tokenizer(["a thriller", "romantic comedy from the nineties"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = backbone(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 384)


def test_write_atomically_leaves_nothing_on_crash_and_keeps_a_winner(tmp_path):
    target = tmp_path / "models" / "m"

    def crash(folder: Path) -> None:
        (folder / "half.bin").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        loading._write_atomically(target, crash)
    assert list((tmp_path / "models").iterdir()) == []  # neither target nor temp folder

    loading._write_atomically(target, lambda folder: (folder / "config.json").write_text("first"))
    loading._write_atomically(target, lambda folder: (folder / "config.json").write_text("second"))  # lost race
    assert (target / "config.json").read_text() == "first"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]


@pytest.mark.slow
def test_smollm2_gguf_converts_once_to_safetensors(monkeypatch):
    """Converts into the user's cache on first use (~25 s), checked against the GGUF's own dequantisation.

    Later runs check the cached folder instead (~3 s) and that loading it converts nothing; the atomic write itself
    is tested above.
    """
    gguf = pytest.importorskip("gguf")
    from safetensors import safe_open

    folder = Path(resolve_model_path(DEFAULT_POLICY))
    assert folder == loading.cache_dir() / "models" / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]  # no half-written folder
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30

    # a Q4_1 tensor dequantised by gguf equals the saved float weight exactly
    reader = gguf.GGUFReader(loading._smollm2_gguf())
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.mlp.down_proj.weight"), expected)

    # from the cache: no second conversion (a converter call would raise), the cached files are not rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_conversion(*args):
        raise AssertionError(f"converted again: {args}")

    monkeypatch.setattr(loading, "_convert_gguf_model", no_conversion)
    monkeypatch.setattr(loading, "_convert_gguf_tokenizer", no_conversion)
    model = load_causal_lm(DEFAULT_POLICY)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    tokenizer = load_tokenizer(DEFAULT_POLICY)
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1] :])


@pytest.mark.parametrize("name", ["./runs/nothing", "runs/sft/nothing", "sft.ckpt", "{tmp}/missing"])
def test_a_missing_local_model_path_is_a_clear_error_not_a_hub_lookup(tmp_path, monkeypatch, name):
    from crslight.data.errors import DataError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    name = name.format(tmp=tmp_path)
    with pytest.raises(DataError, match=f"{name}: no such model folder or file: expected a transformers folder"):
        resolve_model_path(name)
    with pytest.raises(DataError, match="no such model folder"):
        resolve_model_path("runs/sft")  # "runs" is a local folder: a path, not the hub id runs/sft
