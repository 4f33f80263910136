import copy

import pytest
import torch
from torch import nn

from crslight.models.lora import LoRAConfig, apply_lora, disabled_adapters, has_adapters


@pytest.fixture
def batch(tiny_tokenizer):
    return tiny_tokenizer(["Recommend me a thriller", "Thanks!"], return_tensors="pt", padding=True)


@pytest.fixture
def lora_lm(tiny_lm):
    model = apply_lora(copy.deepcopy(tiny_lm), LoRAConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # fresh adapters are an identity; give them weight so they change the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_apply_lora_trains_only_adapters_and_starts_as_identity(tiny_lm, batch):
    model = apply_lora(copy.deepcopy(tiny_lm), LoRAConfig(r=4, alpha=8, dropout=0.0))
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("mlp" in name for name in trainable)  # "all-linear": MLP too, not only attention
    assert not any("lm_head" in name for name in trainable)
    torch.testing.assert_close(logits(model.eval(), batch), logits(tiny_lm, batch))
    assert hasattr(model, "generate")


def test_disabled_adapters_gives_base_logits_exactly_and_toggles_back(lora_lm, tiny_lm, batch):
    base, adapted = logits(tiny_lm, batch), logits(lora_lm, batch)
    assert not torch.allclose(base, adapted)
    with disabled_adapters(lora_lm) as ref:
        assert ref is lora_lm
        assert torch.equal(logits(ref, batch), base)
    assert torch.equal(logits(lora_lm, batch), adapted)
    assert all(p.requires_grad for n, p in lora_lm.named_parameters() if "lora_" in n)


def test_disabled_adapters_restores_after_error_and_keeps_frozen_adapters_frozen(lora_lm, batch):
    adapted = logits(lora_lm, batch)
    lora_lm.requires_grad_(False)
    with pytest.raises(RuntimeError), disabled_adapters(lora_lm):
        raise RuntimeError("boom")
    assert torch.equal(logits(lora_lm, batch), adapted)
    assert not any(p.requires_grad for p in lora_lm.parameters())


def test_disabled_adapters_reaches_into_a_wrapping_module(lora_lm, tiny_lm, batch):
    wrapper = nn.ModuleDict({"policy": lora_lm, "value_head": nn.Linear(64, 1)})
    assert has_adapters(wrapper)
    with disabled_adapters(wrapper):
        assert torch.equal(logits(lora_lm, batch), logits(tiny_lm, batch))
    assert wrapper["value_head"].weight.requires_grad


def test_disabled_adapters_refuses_a_model_without_adapters(tiny_lm):
    assert not has_adapters(tiny_lm)
    with pytest.raises(ValueError, match="no LoRA adapters"), disabled_adapters(tiny_lm):
        pass
