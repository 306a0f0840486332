"""MixLoRAConfig: SPEC defaults, the authors' adapter_config.json keys, validation errors."""
import json

import pytest

from mixlora_ext.config import MixLoRAConfig

# An adapter_config.json as the authors' MoE-PEFT trainer writes it (their MixLoraConfig.export).
AUTHORS_CONFIG = {
    "bias": "none",
    "peft_type": "MIXLORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
    "routing_strategy": "mixlora",
    "num_experts": 8,
    "act_fn": "silu",
    "top_k": 2,
    "expert_lora": {"bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "x",
                    "r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "use_rslora": True},
    "router_aux_loss_coef": 0.01,
}


def test_defaults_follow_spec():
    config = MixLoRAConfig()
    assert (config.top_k, config.router_aux_loss_coef, config.router_init_range, config.jitter_noise) == (2, 0.001, 0.02, 0.0)
    assert (config.peft_type, config.routing_strategy, config.task_type) == ("MIXLORA", "mixlora", "CAUSAL_LM")
    assert config.act_fn is None and config.expert_lora is None
    assert config.expert_targets == ["gate_proj", "up_proj", "down_proj"] and config.attention_targets == []


def test_authors_config_round_trip_keeps_unknown_keys():
    config = MixLoRAConfig.from_dict(AUTHORS_CONFIG)
    assert config.extra == {"bias": "none"}
    written = json.loads(json.dumps(config.to_dict()))
    assert {key: written[key] for key in AUTHORS_CONFIG} == AUTHORS_CONFIG
    assert MixLoRAConfig.from_dict(written) == config
    assert config.attention_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_expert_lora_overrides_only_the_experts():
    config = MixLoRAConfig.from_dict(AUTHORS_CONFIG)
    expert, attention = config.expert_lora_settings, config.attention_lora
    assert (expert.r, expert.lora_alpha, expert.lora_dropout, expert.use_rslora) == (16, 32, 0.1, True)
    assert expert.scaling == pytest.approx(32 / 4)          # rsLoRA: alpha / sqrt(r)
    assert (attention.r, attention.lora_alpha, attention.use_rslora) == (8, 16, False)
    assert attention.scaling == 2.0


def test_top_level_rslora_and_dora_reach_experts_without_expert_lora():
    config = MixLoRAConfig(r=4, lora_alpha=8, use_rslora=True, use_dora=True)
    assert config.expert_lora_settings == config.attention_lora
    assert config.expert_lora_settings.scaling == 4.0 and config.expert_lora_settings.use_dora


def test_target_modules_as_dict_of_bools():
    config = MixLoRAConfig(target_modules={"up_proj": True, "q_proj": True, "gate_proj": False,
                                           "fc1": False})   # the authors list Phi names too
    assert config.targets == ["up_proj", "q_proj"]
    assert config.to_dict()["target_modules"] == {"up_proj": True, "q_proj": True, "gate_proj": False, "fc1": False}


def test_missing_act_fn_is_allowed_and_not_written():
    d = dict(AUTHORS_CONFIG)
    del d["act_fn"]
    config = MixLoRAConfig.from_dict(d)
    assert config.act_fn is None and "act_fn" not in config.to_dict()


def test_our_config_is_accepted_by_the_authors_parser():
    mixlora_config = pytest.importorskip("mixlora.config")
    config = MixLoRAConfig(num_experts=4, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                           act_fn="silu", base_model_name_or_path="tiny",
                           expert_lora={"r": 6, "lora_alpha": 12, "lora_dropout": 0.1})
    theirs = mixlora_config.MixLoraConfig.from_config(config.to_dict())
    theirs.dtype_ = None
    theirs.check()
    assert (theirs.num_experts_, theirs.top_k_, theirs.lora_r_, theirs.expert_config_.lora_r_) == (4, 2, 4, 6)


@pytest.mark.parametrize("change, message", [
    (dict(peft_type="LORA"), "peft_type"),
    (dict(routing_strategy="mixlora-switch"), "routing_strategy"),
    (dict(num_experts=0), "num_experts"),
    (dict(top_k=9), "top_k"),
    (dict(r=0), "r must be"),
    (dict(r=True), "r must be"),
    (dict(lora_alpha=-1), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(target_modules=["q_proj", "dense"]), "dense"),
    (dict(target_modules={"q_proj": "yes"}), "true/false"),
    (dict(target_modules=[]), "no projection"),
    (dict(target_modules="q_proj"), "target_modules"),
    (dict(expert_lora={"r": 0}), "expert_lora.r"),
    (dict(expert_lora={"use_dora": "yes"}), "expert_lora.use_dora"),
    (dict(expert_lora=[1]), "expert_lora must be a dict"),
    (dict(use_rslora=1), "use_rslora"),
    (dict(act_fn=""), "act_fn"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
    (dict(router_init_range="0.02"), "router_init_range"),
    (dict(jitter_noise=1.5), "jitter_noise"),
])
def test_invalid_settings_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        MixLoRAConfig(**change)


def test_from_dict_names_missing_required_keys():
    d = dict(AUTHORS_CONFIG)
    del d["num_experts"], d["r"]
    with pytest.raises(ValueError, match=r"\['num_experts', 'r'\]"):
        MixLoRAConfig.from_dict(d)
    with pytest.raises(ValueError, match="JSON object"):
        MixLoRAConfig.from_dict([1, 2])
