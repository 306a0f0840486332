"""inject_mixlora on tiny Llama / Mistral / Qwen2: registration, freezing, modes, dtypes, generate."""
import pytest
import torch
from torch import nn

from hf_tiny import VOCAB, batch, randomize_adapter, tiny_model
from mixlora_ext.config import MixLoRAConfig
from mixlora_ext.layer import MixLoRAFFN
from mixlora_ext.lora import LoRALinear
from mixlora_ext.model import inject_mixlora

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _config(**changes):
    settings = dict(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"] + MLP)
    settings.update(changes)
    return MixLoRAConfig(**settings)


def _logits(model):
    input_ids, attention_mask = batch()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_every_layer_is_patched_and_registered(arch):
    model = inject_mixlora(tiny_model(arch), _config())
    for layer in model.model.layers:
        assert isinstance(layer.mlp, MixLoRAFFN)
        assert [p for p in ATTENTION if isinstance(getattr(layer.self_attn, p), LoRALinear)] == ["q_proj", "v_proj"]
    names = dict(model.named_parameters())
    assert "model.layers.1.mlp.router" in names and "model.layers.1.mlp.lora_B.down_proj" in names
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in model.state_dict()
    assert "model.layers.0.mlp.base_layer.gate_proj.weight" in model.state_dict()
    assert model.mixlora_config.act_fn == "silu"   # recorded, so the authors' loader can read a saved folder


def test_only_router_and_lora_weights_train():
    model = inject_mixlora(tiny_model("llama"), _config(use_dora=True, target_modules=ATTENTION + MLP))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = []
    for i in range(2):
        expected += [f"model.layers.{i}.mlp.router"]
        expected += [f"model.layers.{i}.mlp.{kind}.{p}" for kind in ("lora_A", "lora_B", "magnitude") for p in MLP]
        expected += [f"model.layers.{i}.self_attn.{p}.{w}" for p in ATTENTION
                     for w in ("lora_A.weight", "lora_B.weight", "magnitude")]
    assert trainable == sorted(expected)


@pytest.mark.parametrize("use_dora", [False, True])
def test_fresh_adapter_leaves_the_output_unchanged(use_dora):
    # B = 0 and renormalized top-k weights: every expert is the base MLP, so the model is the base model.
    base = _logits(tiny_model("llama", torch.float64))
    config = _config(target_modules=ATTENTION + MLP, use_dora=use_dora)
    patched = _logits(inject_mixlora(tiny_model("llama", torch.float64), config))
    torch.testing.assert_close(patched, base, rtol=1e-12, atol=1e-12)


def test_eval_turns_dropout_off_and_train_turns_it_on():
    model = randomize_adapter(inject_mixlora(tiny_model("llama"), _config(lora_dropout=0.3)))
    reference = randomize_adapter(inject_mixlora(tiny_model("llama"), _config(lora_dropout=0.0)))
    model.train()
    assert all(m.training for m in model.modules() if isinstance(m, (MixLoRAFFN, LoRALinear)))
    with torch.no_grad():
        first, second = _logits(model), _logits(model)
    assert not torch.equal(first, second), "dropout should make two training forwards differ"
    model.eval()
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(_logits(model), _logits(reference.eval()))


def test_to_moves_adapter_weights_with_the_model():
    model = inject_mixlora(tiny_model("llama"), _config())
    layer = model.model.layers[0]
    assert layer.mlp.router.dtype == torch.float32 and layer.self_attn.q_proj.lora_A.weight.dtype == torch.float32
    model.to(torch.float64)
    assert layer.mlp.router.dtype == torch.float64 and layer.mlp.lora_B["up_proj"].dtype == torch.float64
    assert layer.self_attn.q_proj.lora_A.weight.dtype == torch.float64


def test_bfloat16_model_keeps_float32_adapter_weights():
    model = randomize_adapter(inject_mixlora(tiny_model("llama", torch.bfloat16), _config()))
    assert model.model.layers[0].mlp.router.dtype == torch.float32
    assert model.model.layers[0].self_attn.v_proj.lora_B.weight.dtype == torch.float32
    with torch.no_grad():
        logits = _logits(model)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_generate_is_the_same_with_and_without_kv_cache():
    model = randomize_adapter(inject_mixlora(tiny_model("llama", torch.float64), _config(target_modules=ATTENTION + MLP)))
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(prompt, use_cache=True, **settings)
    without_cache = model.generate(prompt, use_cache=False, **settings)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without_cache)


def test_unsupported_models_and_configs_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        inject_mixlora(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)), _config())
    with pytest.raises(TypeError, match="Linear"):
        inject_mixlora(nn.Linear(2, 2), _config())
    with pytest.raises(TypeError, match="MixLoRAConfig"):
        inject_mixlora(tiny_model("llama"), {"num_experts": 4})
    model = inject_mixlora(tiny_model("llama"), _config())
    with pytest.raises(ValueError, match="already carries a MixLoRA adapter"):
        inject_mixlora(model, _config())


def test_failed_injection_leaves_the_model_untouched():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="tanh"):
        inject_mixlora(model, _config(act_fn="tanh"))
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, (MixLoRAFFN, LoRALinear)) for m in model.modules())
