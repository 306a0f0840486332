"""Tiny random Hugging Face causal LMs for the integration tests (built from configs, no downloads)."""
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from mixlora_ext.checkpoint import adapter_state_dict

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
VOCAB = 128


def tiny_model(arch="llama", dtype=torch.float32, seed=0, **overrides):
    """A 2-layer random model in eval mode; the same seed gives the same weights."""
    config_cls, model_cls = ARCHITECTURES[arch]
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=False, attn_implementation="eager")
    settings.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**settings)).to(dtype).eval()


def randomize_adapter(model, seed=1):
    """Random values in every adapter tensor (a zero B would hide bugs); magnitudes scaled by 0.5-1.5."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in adapter_state_dict(model).items():
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float64)
            if key.endswith(".magnitude_vector"):
                value.mul_(0.5 + torch.rand(value.shape, generator=gen, dtype=torch.float64))
            elif key.endswith("moe_gate.weight"):
                value.copy_(noise)  # a strong router: routing differs from token to token
            else:
                value.copy_(0.2 * noise)
    return model


def batch(batch_size=2, seq_len=9, seed=2, pad=2):
    """input_ids and an attention_mask whose first row ends in `pad` padding tokens."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=gen)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if pad:
        attention_mask[0, -pad:] = 0
    return input_ids, attention_mask
