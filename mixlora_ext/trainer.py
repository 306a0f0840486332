"""MixLoRATrainer: `transformers.Trainer` with the router load-balance loss and adapter checkpoints.

This module imports transformers; `import mixlora_ext` does not (it exposes `MixLoRATrainer`
lazily). Written for transformers >= 4.46 (the `num_items_in_batch` loss API) and tested on 5.x.
"""
from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from .aux_loss import router_aux_loss
from .checkpoint import restore_adapter_weights, save_adapter


class MixLoRATrainer(Trainer):
    """A Trainer for a model patched by `inject_mixlora` or `load_adapter`.

    - The loss is the model's LM loss plus `router_aux_loss(model, attention_mask)` of the same
      forward, in training and evaluation; the logged `loss` is that sum, and `aux_loss` (the
      mean since the last log) is logged next to it.
    - `save_model` and checkpoints write the adapter folder (`save_adapter`), not the base model;
      `resume_from_checkpoint` and `load_best_model_at_end` read it back.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._aux_sum = None   # a device tensor: summing it costs no host sync
        self._aux_batches = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch, **kwargs)
        aux = router_aux_loss(model, inputs.get("attention_mask"))
        if model.training:
            self._aux_sum = aux.detach() if self._aux_sum is None else self._aux_sum + aux.detach()
            self._aux_batches += 1
        loss = loss + self._aux_scale(num_items_in_batch) * aux
        return (loss, outputs) if return_outputs else loss

    def _aux_scale(self, num_items_in_batch) -> float:
        """The factor Trainer has already put on the LM loss and will not put on ours.

        When the model normalizes its loss over the whole accumulated batch (`num_items_in_batch`),
        Trainer skips its division by the gradient accumulation steps and multiplies by the number
        of processes; the per-batch aux loss must be scaled the same way.
        """
        compute_loss_func = getattr(self, "compute_loss_func", None)
        accepts_kwargs = getattr(self, "model_accepts_loss_kwargs", False)
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = (accepts_kwargs and num_items_in_batch is not None) or compute_loss_func is not None
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scale = 1.0 / steps if scaled_for_ga else 1.0
        if (getattr(self.args, "average_tokens_across_devices", False) and num_items_in_batch is not None
                and (accepts_kwargs or compute_loss_func is not None)):
            scale *= self.accelerator.num_processes
        return scale

    def log(self, logs, *args, **kwargs):
        if self._aux_batches and "loss" in logs:
            logs["aux_loss"] = (self._aux_sum / self._aux_batches).item()  # host-sync-ok: once per logging step
            self._aux_sum, self._aux_batches = None, 0
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir)
        processing_class = getattr(self, "processing_class", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        restore_adapter_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self):
        restore_adapter_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)
