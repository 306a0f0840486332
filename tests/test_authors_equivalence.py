"""Same logits as the authors' `mixlora` 0.2.3 for adapter folders in their format (float64).

The authors' model is built with their own loader and modules. Two of their defects are
worked around on their side only, so that the comparison is of the math: their expert LoRAs
are put in eval mode one by one (`model.eval()` does not reach them, so dropout would stay on),
and `act_fn` is set where the folder lacks it (their layer crashes without it). Their
standalone loader also ignores `expert_lora` (MoE-PEFT, which trained these adapters, honours
it); for configs with `expert_lora` the reference builds their expert modules with the expert
settings, using their own `_inject_mlp_module`.
"""
import copy
import json

import pytest
import torch

from hf_tiny import batch, tiny_model
from mixlora_ext.checkpoint import adapter_state_dict, load_adapter, save_adapter

authors = pytest.importorskip("mixlora.model", reason="the authors' package: pip install mixlora==0.2.3")

BASE_CONFIG = dict(peft_type="MIXLORA", routing_strategy="mixlora", task_type="CAUSAL_LM",
                   base_model_name_or_path="tiny", num_experts=4, top_k=2, r=4, lora_alpha=8,
                   lora_dropout=0.05)
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    # name: (architecture, adapter_config.json changes, scale the DoRA magnitudes after loading)
    "llama-no-act_fn": ("llama", dict(target_modules=ALL_TARGETS), False),
    "mistral-top1-dict-targets": ("mistral", dict(top_k=1, act_fn="silu", target_modules={
        "q_proj": True, "o_proj": True, "gate_proj": True, "up_proj": False, "down_proj": True}), False),
    "qwen2-biased-attention": ("qwen2", dict(num_experts=3, target_modules=ALL_TARGETS), False),
    "llama-expert_lora": ("llama", dict(target_modules=["v_proj", "gate_proj", "up_proj", "down_proj"],
                                        expert_lora=dict(r=6, lora_alpha=24, lora_dropout=0.1)), False),
    "mistral-rslora": ("mistral", dict(use_rslora=True, lora_alpha=6, target_modules=ALL_TARGETS), False),
    "llama-dora-as-loaded": ("llama", dict(use_dora=True, target_modules=ALL_TARGETS), False),
    "mistral-dora-trained": ("mistral", dict(use_dora=True, target_modules=ALL_TARGETS), True),
    "llama-expert-dora-rslora": ("llama", dict(target_modules=["q_proj", "up_proj", "down_proj"], expert_lora=dict(
        r=8, lora_alpha=4, use_dora=True, use_rslora=True)), True),
    "qwen2-dora-biased-attention": ("qwen2", dict(use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]), True),
}


def _base_model(arch):
    # Larger than the default init (0.02) so that the MLPs weigh in the logits and a small
    # difference in the MixLoRA layers would show.
    return tiny_model(arch, torch.float64, initializer_range=0.1)


def _write_authors_folder(path, model, config, seed=0):
    """adapter_config.json + adapter_model.bin (fp32 torch.save) with random weights, authors' keys."""
    gen = torch.Generator().manual_seed(seed)
    expert_r = (config.get("expert_lora") or {}).get("r", config["r"])
    targets = config["target_modules"]
    targets = [t for t, on in targets.items() if on] if isinstance(targets, dict) else targets
    weights = {}
    for idx, layer in enumerate(model.model.layers):
        prefix = f"mixlora.layers.{idx}"
        weights[f"{prefix}.mlp.moe_gate.weight"] = torch.randn(config["num_experts"], model.config.hidden_size, generator=gen)
        for proj in targets:
            if proj in ("gate_proj", "up_proj", "down_proj"):
                base = getattr(layer.mlp, proj)
                names = [(f"{prefix}.mlp.{proj}.experts.{e}", expert_r) for e in range(config["num_experts"])]
            else:
                base = getattr(layer.self_attn, proj)
                names = [(f"{prefix}.self_attn.{proj}", config["r"])]
            for name, r in names:
                weights[f"{name}.lora_A.weight"] = 0.2 * torch.randn(r, base.in_features, generator=gen)
                weights[f"{name}.lora_B.weight"] = 0.2 * torch.randn(base.out_features, r, generator=gen)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    torch.save(weights, path / "adapter_model.bin")


def _authors_model(arch, path):
    """The authors' MixLoRA model in float64, dropout off everywhere."""
    model = _base_model(arch)
    config, weights = authors.load_adapter_weights(str(path), device="cpu", dtype=torch.float64)
    if config.act_fn_ is None:
        config.act_fn_ = model.config.hidden_act
    config.model_type_ = model.config.model_type
    experts = copy.deepcopy(config)
    if config.expert_config_ is not None:
        for field in ("lora_r_", "lora_alpha_", "lora_dropout_", "use_rslora_", "use_dora_"):
            setattr(experts, field, getattr(config.expert_config_, field))
    for idx, layer in enumerate(model.model.layers):   # = their inject_adapter_in_model, experts aside
        authors._inject_attn_module(idx, layer.self_attn, config, weights)
        authors._inject_mlp_module(idx, layer.mlp, experts, weights)
    model.eval()
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return model


def _authors_magnitude(model, key):
    parts = key.split(".")        # mixlora.layers.L.mlp.proj.experts.e.magnitude_vector / ...self_attn.proj....
    layer = model.model.layers[int(parts[2])]
    if parts[3] == "mlp":
        moe = layer.mlp.mixlora_moes["default"]
        return moe.experts_[f"experts.{parts[6]}.{parts[4]}"].magnitude_vector_
    return getattr(layer.self_attn, parts[4]).magnitude_vector_


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_authors(tmp_path, case):
    arch, changes, scale_magnitudes = CASES[case]
    config = dict(BASE_CONFIG, **changes)
    _write_authors_folder(tmp_path, _base_model(arch), config)
    theirs = _authors_model(arch, tmp_path)
    ours = load_adapter(_base_model(arch), str(tmp_path)).eval()

    magnitudes = {k: v for k, v in adapter_state_dict(ours).items() if k.endswith(".magnitude_vector")}
    assert bool(magnitudes) == bool(config.get("use_dora") or config.get("expert_lora", {}).get("use_dora"))
    for key, ours_value in magnitudes.items():
        theirs_value = _authors_magnitude(theirs, key)
        torch.testing.assert_close(ours_value, theirs_value.detach(), rtol=1e-12, atol=0)  # both recomputed
        if scale_magnitudes:  # as if trained: DoRA stops being a no-op
            with torch.no_grad():
                ours_value.mul_(torch.linspace(0.5, 1.5, ours_value.numel(), dtype=torch.float64))
                theirs_value.copy_(ours_value)

    input_ids, attention_mask = batch()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, attention_mask=attention_mask).logits
        got = ours(input_ids=input_ids, attention_mask=attention_mask).logits
        base = _base_model(arch)(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (expected - base).abs().max() > 1e-2   # the adapter really changes the output
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_authors_loader_reads_our_bin_folder(tmp_path):
    config = dict(BASE_CONFIG, target_modules=ALL_TARGETS)
    _write_authors_folder(tmp_path / "src", _base_model("llama"), config)
    ours = load_adapter(_base_model("llama"), str(tmp_path / "src")).eval()
    save_adapter(ours, str(tmp_path / "ours"), safe_serialization=False)
    theirs = _authors_model("llama", tmp_path / "ours")
    input_ids, attention_mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   theirs(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   rtol=1e-10, atol=1e-10)
