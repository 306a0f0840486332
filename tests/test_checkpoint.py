"""save_adapter / load_adapter / adapter_state_dict: key names, bitwise round trip, errors, atomicity."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixlora_ext.checkpoint as checkpoint
from hf_tiny import batch, randomize_adapter, tiny_model
from mixlora_ext.checkpoint import adapter_state_dict, load_adapter, restore_adapter_weights, save_adapter
from mixlora_ext.config import MixLoRAConfig
from mixlora_ext.layer import MixLoRAFFN
from mixlora_ext.model import inject_mixlora


def _config(**changes):
    settings = dict(num_experts=3, top_k=2, r=4, lora_alpha=8, lora_dropout=0.1,
                    target_modules=["q_proj", "o_proj", "gate_proj", "down_proj"])
    settings.update(changes)
    return MixLoRAConfig(**settings)


def _patched(arch="llama", **changes):
    return randomize_adapter(inject_mixlora(tiny_model(arch), _config(**changes)))


def _logits(model):
    input_ids, attention_mask = batch()
    with torch.no_grad():
        return model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits


def test_keys_and_shapes_follow_the_authors_naming():
    model = _patched(expert_lora={"r": 6})
    H, I = 32, 48
    expected = {}
    for L in range(2):
        expected[f"mixlora.layers.{L}.mlp.moe_gate.weight"] = (3, H)
        for proj, (fan_in, fan_out) in {"gate_proj": (H, I), "down_proj": (I, H)}.items():
            for e in range(3):
                expected[f"mixlora.layers.{L}.mlp.{proj}.experts.{e}.lora_A.weight"] = (6, fan_in)
                expected[f"mixlora.layers.{L}.mlp.{proj}.experts.{e}.lora_B.weight"] = (fan_out, 6)
        for proj in ("q_proj", "o_proj"):
            expected[f"mixlora.layers.{L}.self_attn.{proj}.lora_A.weight"] = (4, H)
            expected[f"mixlora.layers.{L}.self_attn.{proj}.lora_B.weight"] = (H, 4)
    assert {k: tuple(v.shape) for k, v in adapter_state_dict(model).items()} == expected


def test_state_dict_values_are_the_live_parameters():
    model = _patched()
    state = adapter_state_dict(model)
    mlp, q_proj = model.model.layers[1].mlp, model.model.layers[1].self_attn.q_proj
    assert state["mixlora.layers.1.mlp.moe_gate.weight"].data_ptr() == mlp.router.data_ptr()
    assert state["mixlora.layers.1.self_attn.q_proj.lora_B.weight"].data_ptr() == q_proj.lora_B.weight.data_ptr()
    with torch.no_grad():
        state["mixlora.layers.1.mlp.down_proj.experts.2.lora_B.weight"].fill_(7.0)
    assert (mlp.lora_B["down_proj"][2] == 7.0).all() and not (mlp.lora_B["down_proj"][1] == 7.0).all()


@pytest.mark.parametrize("arch, safe, changes", [
    ("llama", True, {}),
    ("mistral", False, {}),
    ("qwen2", True, dict(use_dora=True, use_rslora=True)),
])
def test_round_trip_gives_bitwise_identical_logits(tmp_path, arch, safe, changes):
    model = _patched(arch, **changes)
    save_adapter(model, str(tmp_path / "adapter"), safe_serialization=safe)
    weights_file = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert sorted(os.listdir(tmp_path / "adapter")) == sorted(["adapter_config.json", weights_file])
    saved = checkpoint.read_adapter_weights(str(tmp_path / "adapter"))
    live = adapter_state_dict(model)
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in live)

    loaded = load_adapter(tiny_model(arch), str(tmp_path / "adapter"))
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.mixlora_config == model.mixlora_config


def _saved_folder(tmp_path, **changes):
    path = tmp_path / "adapter"
    save_adapter(_patched(**changes), str(path))
    return path


def _rewrite_weights(path, edit):
    weights = load_file(path / "adapter_model.safetensors")
    edit(weights)
    save_file(weights, path / "adapter_model.safetensors")


def _assert_load_fails_cleanly(path, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        load_adapter(model, str(path))
    assert not any(isinstance(m, MixLoRAFFN) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "mixlora_config")


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    path = _saved_folder(tmp_path)

    def edit(weights):
        del weights["mixlora.layers.1.mlp.gate_proj.experts.2.lora_A.weight"]
        weights["mixlora.layers.7.mlp.moe_gate.weight"] = torch.zeros(3, 32)
        weights["mixlora.layers.0.self_attn.o_proj.lora_B.weight"] = torch.zeros(32, 5)

    _rewrite_weights(path, edit)
    _assert_load_fails_cleanly(path, r"(?s)missing 1 tensors: mixlora\.layers\.1\.mlp\.gate_proj\.experts\.2\.lora_A\.weight"
                                     r".*unexpected 1 tensors: mixlora\.layers\.7\.mlp\.moe_gate\.weight"
                                     r".*o_proj\.lora_B\.weight \(32, 5\) \(expected \(32, 4\)\)")


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path):
    path = _saved_folder(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["num_experts"] = 4
    (path / "adapter_config.json").write_text(json.dumps(config))
    _assert_load_fails_cleanly(path, r"missing 8 tensors: .*experts\.3")


def test_dora_magnitudes_are_all_or_nothing(tmp_path):
    path = _saved_folder(tmp_path, use_dora=True)
    _rewrite_weights(path, lambda w: w.pop("mixlora.layers.0.self_attn.q_proj.magnitude_vector"))
    _assert_load_fails_cleanly(path, r"missing 1 tensors: mixlora\.layers\.0\.self_attn\.q_proj\.magnitude_vector")


def test_dora_magnitudes_absent_are_recomputed_like_the_authors(tmp_path):
    path = _saved_folder(tmp_path, use_dora=True)
    _rewrite_weights(path, lambda w: [w.pop(k) for k in list(w) if k.endswith("magnitude_vector")])
    model = load_adapter(tiny_model("llama", torch.float64), str(path))
    layer = model.model.layers[0]
    A, B, W = layer.mlp.lora_A["down_proj"], layer.mlp.lora_B["down_proj"], layer.mlp.base_layer.down_proj.weight
    expected = torch.linalg.norm(W + layer.mlp.scaling * (B @ A), dim=-1)              # [E, out]
    torch.testing.assert_close(layer.mlp.magnitude["down_proj"], expected, rtol=1e-12, atol=0)
    q = layer.self_attn.q_proj
    torch.testing.assert_close(q.magnitude, torch.linalg.norm(q.base_layer.weight + q.scaling * q.lora_B.weight @ q.lora_A.weight, dim=1))


class NotATensor:
    pass


def test_bin_is_loaded_with_weights_only(tmp_path):
    path = _saved_folder(tmp_path)
    os.remove(path / "adapter_model.safetensors")
    torch.save({"mixlora.layers.0.mlp.moe_gate.weight": NotATensor()}, path / "adapter_model.bin")
    _assert_load_fails_cleanly(path, "weights_only")


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model("llama"), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps(_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors or adapter_model.bin"):
        load_adapter(tiny_model("llama"), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(tiny_model("llama"), str(tmp_path))


def test_unpatched_models_have_no_adapter_to_save(tmp_path):
    with pytest.raises(ValueError, match="no MixLoRA adapter"):
        save_adapter(tiny_model("llama"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="no MixLoRA adapter"):
        adapter_state_dict(tiny_model("llama"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        save_adapter(_patched(), str(tmp_path / "file"))


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_crash_mid_save_leaves_the_previous_adapter(tmp_path, monkeypatch, atomic_exchange):
    path = tmp_path / "adapter"
    first = _patched()
    save_adapter(first, str(path))
    (path / "README.md").write_text("notes kept across saves")
    if not atomic_exchange:
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    write_file = checkpoint._write_file

    def crash_on_weights(file, write):
        if file.endswith(".bin"):
            raise KeyboardInterrupt("power cut")
        write_file(file, write)

    monkeypatch.setattr(checkpoint, "_write_file", crash_on_weights)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(_patched(), str(path), safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]          # no staging folder left behind
    assert torch.equal(_logits(load_adapter(tiny_model("llama"), str(path))), _logits(first))

    monkeypatch.setattr(checkpoint, "_write_file", write_file)
    second = _patched(num_experts=2)
    save_adapter(second, str(path), safe_serialization=False)   # replaces the folder, keeps other files
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert torch.equal(_logits(load_adapter(tiny_model("llama"), str(path))), _logits(second))


def test_restore_adapter_weights_into_a_patched_model(tmp_path):
    trained = _patched()
    save_adapter(trained, str(tmp_path / "a"))
    model = inject_mixlora(tiny_model("llama"), _config())
    restore_adapter_weights(model, str(tmp_path / "a"))
    assert torch.equal(_logits(model), _logits(trained))
    other = inject_mixlora(tiny_model("llama"), _config(r=2))
    with pytest.raises(ValueError, match="mis-shaped"):
        restore_adapter_weights(other, str(tmp_path / "a"))
