"""Training: the pooled masked aux loss, gradients only on adapters, loss going down, Trainer integration."""
import json
import os

import pytest
import torch

from hf_tiny import VOCAB, batch, randomize_adapter, tiny_model
from mixlora_ext.aux_loss import expert_load, router_aux_loss
from mixlora_ext.checkpoint import adapter_state_dict
from mixlora_ext.config import MixLoRAConfig
from mixlora_ext.layer import MixLoRAFFN
from mixlora_ext.model import inject_mixlora

E, K, COEF = 4, 2, 0.01


def _patched(dtype=torch.float64, **changes):
    settings = dict(num_experts=E, top_k=K, r=4, lora_alpha=8, lora_dropout=0.0, router_aux_loss_coef=COEF,
                    target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    settings.update(changes)
    return inject_mixlora(tiny_model("llama", dtype), MixLoRAConfig(**settings))


def _layers(model):
    return [m for m in model.modules() if isinstance(m, MixLoRAFFN)]


@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_is_the_pooled_switch_loss(masked):
    # transformers' Mixtral load_balancing_loss_func pools all layers' tokens the same way (SPEC section 2).
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = randomize_adapter(_patched())
    input_ids, attention_mask = batch(batch_size=3, seq_len=7, pad=3)
    mask = attention_mask if masked else None
    model(input_ids=input_ids, attention_mask=attention_mask)
    router_logits = tuple(layer.last_probs.log() for layer in _layers(model))   # softmax(log p) = p
    expected = COEF * load_balancing_loss_func(router_logits, E, K, mask)
    torch.testing.assert_close(router_aux_loss(model, mask), expected.to(torch.float64), rtol=1e-6, atol=0)


def test_padding_does_not_count():
    model = randomize_adapter(_patched())
    input_ids, attention_mask = batch(pad=3)
    model(input_ids=input_ids, attention_mask=attention_mask)
    aux, load = router_aux_loss(model, attention_mask), expert_load(model, attention_mask)
    input_ids[0, -3:] = (input_ids[0, -3:] + 1) % VOCAB       # other padding tokens, same real tokens
    model(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(router_aux_loss(model, attention_mask), aux, rtol=1e-12, atol=0)
    torch.testing.assert_close(expert_load(model, attention_mask), load)
    assert load.shape == (2, E)
    torch.testing.assert_close(load.sum(dim=1), torch.ones(2, dtype=load.dtype))


def test_a_uniform_router_gives_coef_times_k():
    model = _patched()
    with torch.no_grad():
        for layer in _layers(model):
            layer.router.zero_()
    model(input_ids=batch()[0])
    torch.testing.assert_close(router_aux_loss(model), torch.tensor(COEF * K, dtype=torch.float64))


def test_aux_loss_errors_are_clear():
    model = _patched()
    with pytest.raises(RuntimeError, match="forward pass"):
        router_aux_loss(model)
    model(input_ids=batch()[0])
    with pytest.raises(ValueError, match="attention_mask has 4 entries"):
        router_aux_loss(model, torch.ones(2, 2))
    with pytest.raises(ValueError, match="no MixLoRA layers"):
        router_aux_loss(tiny_model("llama"))


def test_training_lowers_the_loss_and_only_adapters_get_gradients():
    torch.manual_seed(0)
    model = _patched(torch.float32, lora_dropout=0.05).train()
    input_ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones_like(input_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
        aux = router_aux_loss(model, attention_mask)
        (out.loss + aux).backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.25, losses

    adapter = {p for p in adapter_state_dict(model).values()}   # views; compare by storage below
    adapter_storages = {t.untyped_storage().data_ptr() for t in adapter}
    for name, p in model.named_parameters():
        if p.untyped_storage().data_ptr() in adapter_storages:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant):
    model = _patched(torch.float32).train()
    settings = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
    input_ids, attention_mask = batch()
    model(input_ids=input_ids, attention_mask=attention_mask)
    if use_reentrant:   # its forward runs without autograd: the aux loss would silently not train
        with pytest.raises(RuntimeError, match="use_reentrant"):
            router_aux_loss(model, attention_mask)
        return
    router_aux_loss(model, attention_mask).backward()
    assert all(layer.router.grad.abs().sum() > 0 for layer in _layers(model))


def test_trainer_adds_the_aux_loss_logs_it_and_checkpoints_the_adapter(tmp_path):
    from transformers import TrainingArguments

    from mixlora_ext.trainer import MixLoRATrainer

    model = _patched(torch.float32)
    gen = torch.Generator().manual_seed(7)
    data = []
    for _ in range(16):
        ids = torch.randint(0, VOCAB, (12,), generator=gen)
        data.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=2, save_steps=4, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_only_model=True)
    trainer = MixLoRATrainer(model=model, args=args, train_dataset=data)

    inputs = {k: torch.stack([d[k] for d in data[:4]]) for k in data[0]}
    loss = trainer.compute_loss(model, dict(inputs))
    lm_loss = model(**inputs).loss
    torch.testing.assert_close(loss, lm_loss + router_aux_loss(model, inputs["attention_mask"]))

    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "aux_loss" in entry]
    assert len(logged) == 2 and all(0 < entry["aux_loss"] < 1 for entry in logged)
    checkpoint = tmp_path / "checkpoint-4"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert "model.safetensors" not in os.listdir(checkpoint)

    fresh = _patched(torch.float32)
    MixLoRATrainer(model=fresh, args=args, train_dataset=data)._load_from_checkpoint(str(checkpoint))
    for key, value in adapter_state_dict(fresh).items():
        assert torch.equal(value, adapter_state_dict(model)[key]), key


def test_trainer_scales_the_aux_loss_like_the_lm_loss_under_gradient_accumulation(tmp_path):
    # With gradient accumulation the model normalizes its loss over the whole accumulated batch
    # and Trainer does not divide by the steps, so the per-batch aux loss must be divided instead.
    from transformers import TrainerCallback, TrainingArguments

    from mixlora_ext.trainer import MixLoRATrainer

    model, reference = randomize_adapter(_patched()), randomize_adapter(_patched())
    calls, grads = [], {}

    class Recording(MixLoRATrainer):
        def compute_loss(self, model, inputs, *args, num_items_in_batch=None, **kwargs):
            calls.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
            return super().compute_loss(model, inputs, *args, num_items_in_batch=num_items_in_batch, **kwargs)

    class CaptureGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    gen = torch.Generator().manual_seed(8)
    data = []
    for length in (12, 12, 12, 12):
        ids = torch.randint(0, VOCAB, (length,), generator=gen)
        labels = ids.clone()
        labels[: int(torch.randint(1, 8, (), generator=gen))] = -100     # unequal label counts
        data.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_grad_norm=0, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no")
    Recording(model=model, args=args, train_dataset=data, callbacks=[CaptureGradients()]).train()

    assert len(calls) == 2 and calls[0][1] is not None
    total = sum(reference(**inputs, num_items_in_batch=n).loss
                + router_aux_loss(reference, inputs["attention_mask"]) / 2 for inputs, n in calls)
    total.backward()
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_example_script_runs(tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "train.py"
    monkeypatch.setattr(sys, "argv", ["train.py", "--examples", "33", "--epochs", "1", "--batch-size", "8",
                                      "--experts", "4", "--log-every", "2", "--output", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "expert_load.png").stat().st_size > 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["num_experts"] == 4 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
