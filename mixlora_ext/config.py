"""MixLoRAConfig: the fields of the authors' adapter_config.json (SPEC section 3)."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoRASettings:
    """Rank, scale and dropout of one kind of LoRA (the experts', or attention's)."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool = False
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class MixLoRAConfig:
    """One MixLoRA adapter: experts, router and attention LoRA, as in adapter_config.json.

    Experts use the `expert_lora` block (r, lora_alpha, lora_dropout, use_rslora, use_dora)
    where present, else the top-level values; attention LoRA always uses the top-level values.
    A missing `act_fn` means the model's own `hidden_act`.
    """

    num_experts: int = 8
    top_k: int = 2
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: Union[List[str], Dict[str, bool]] = field(
        default_factory=lambda: list(MLP_PROJECTIONS))
    act_fn: Optional[str] = None
    use_rslora: bool = False
    use_dora: bool = False
    expert_lora: Optional[Dict[str, Any]] = None
    router_aux_loss_coef: float = 0.001
    router_init_range: float = 0.02
    jitter_noise: float = 0.0
    routing_strategy: str = "mixlora"
    peft_type: str = "MIXLORA"
    base_model_name_or_path: Optional[str] = None
    task_type: str = "CAUSAL_LM"
    # Keys this version does not know, kept so that a loaded config is written back whole.
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # --- derived settings -------------------------------------------------------------
    @property
    def targets(self) -> List[str]:
        """The targeted projection names, in a fixed order."""
        tm = self.target_modules
        names = [n for n, on in tm.items() if on] if isinstance(tm, dict) else list(tm)
        order = MLP_PROJECTIONS + ATTENTION_PROJECTIONS
        return sorted(set(names), key=lambda n: order.index(n) if n in order else len(order))

    @property
    def expert_targets(self) -> List[str]:
        return [n for n in self.targets if n in MLP_PROJECTIONS]

    @property
    def attention_targets(self) -> List[str]:
        return [n for n in self.targets if n in ATTENTION_PROJECTIONS]

    @property
    def attention_lora(self) -> LoRASettings:
        return LoRASettings(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.use_dora)

    @property
    def expert_lora_settings(self) -> LoRASettings:
        """The experts use the `expert_lora` block where present, else the top-level values."""
        merged = dict(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                      use_rslora=self.use_rslora, use_dora=self.use_dora)
        for key in merged:
            if self.expert_lora and key in self.expert_lora:
                merged[key] = self.expert_lora[key]
        return LoRASettings(**merged)

    # --- validation --------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ValueError naming the offending field; called on construction."""
        def fail(msg):
            raise ValueError(f"MixLoRAConfig: {msg}")

        def is_int(v):  # bool is an int subclass, but `r: true` is a config error
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if self.peft_type != "MIXLORA":
            fail(f"peft_type must be 'MIXLORA', got {self.peft_type!r}")
        if self.routing_strategy != "mixlora":
            fail(f"routing_strategy {self.routing_strategy!r} is not supported (only 'mixlora'; "
                 "'mixlora-dynamic' and 'mixlora-switch' are not implemented)")
        if not is_int(self.num_experts) or self.num_experts < 1:
            fail(f"num_experts must be a positive int, got {self.num_experts!r}")
        if not is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            fail(f"top_k must be an int in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if not isinstance(self.target_modules, (list, tuple, dict)):
            fail(f"target_modules must be a list of names or a dict of bools, got {type(self.target_modules).__name__}")
        if isinstance(self.target_modules, dict):
            not_bool = [n for n, on in self.target_modules.items() if not isinstance(on, bool)]
            if not_bool:
                fail(f"target_modules values must be true/false, not for {not_bool}")
        unknown = [n for n in self.targets if n not in MLP_PROJECTIONS + ATTENTION_PROJECTIONS]
        if unknown:
            fail(f"target_modules has unsupported names {unknown}; supported: "
                 f"{list(MLP_PROJECTIONS + ATTENTION_PROJECTIONS)}")
        if not self.targets:
            fail("target_modules selects no projection")
        if self.act_fn is not None and (not isinstance(self.act_fn, str) or not self.act_fn):
            fail(f"act_fn must be an activation name such as 'silu' (or absent), got {self.act_fn!r}")
        if self.expert_lora is not None and not isinstance(self.expert_lora, dict):
            fail(f"expert_lora must be a dict, got {type(self.expert_lora).__name__}")
        for where, s in (("", self.attention_lora), ("expert_lora.", self.expert_lora_settings)):
            if not is_int(s.r) or s.r < 1:
                fail(f"{where}r must be a positive int, got {s.r!r}")
            if not is_number(s.lora_alpha) or s.lora_alpha <= 0:
                fail(f"{where}lora_alpha must be positive, got {s.lora_alpha!r}")
            if not is_number(s.lora_dropout) or not 0 <= s.lora_dropout < 1:
                fail(f"{where}lora_dropout must be in [0, 1), got {s.lora_dropout!r}")
            for flag in ("use_rslora", "use_dora"):
                if not isinstance(getattr(s, flag), bool):
                    fail(f"{where}{flag} must be true or false, got {getattr(s, flag)!r}")
        for name, low, high in (("router_aux_loss_coef", 0, math.inf), ("router_init_range", 0, math.inf),
                                ("jitter_noise", 0, 1)):
            value = getattr(self, name)
            if not is_number(value) or not low <= value < high:
                fail(f"{name} must be a number in [{low}, {high}), got {value!r}")

    # --- the authors' adapter_config.json ------------------------------------------------
    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MixLoRAConfig":
        """Reads the authors' adapter_config.json keys; unknown keys go to `extra`."""
        if not isinstance(d, dict):
            raise ValueError(f"MixLoRAConfig: adapter config must be a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [key for key in ("num_experts", "r", "lora_alpha", "lora_dropout", "target_modules") if key not in d]
        if missing:
            raise ValueError(f"MixLoRAConfig: adapter config lacks required keys {missing}")
        kwargs = {key: d.pop(key) for key in list(d) if key in known}
        return cls(**kwargs, extra=d)

    def to_dict(self) -> Dict[str, Any]:
        """The adapter_config.json keys, unknown keys included; absent optional keys are left out."""
        d = copy.deepcopy(dict(self.extra))
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in ("act_fn", "expert_lora", "base_model_name_or_path"):
                continue
            d[f.name] = copy.deepcopy(value)
        return d
