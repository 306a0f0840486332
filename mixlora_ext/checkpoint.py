"""Adapter folders in the authors' format (SPEC section 3): save_adapter, load_adapter, adapter_state_dict.

A folder holds `adapter_config.json` and the weights, `adapter_model.safetensors` (default) or
`adapter_model.bin` (a `torch.save`d dict, what the authors' tools read and write):

    mixlora.layers.{L}.mlp.moe_gate.weight                                    [E, H]
    mixlora.layers.{L}.mlp.{proj}.experts.{e}.lora_A.weight / .lora_B.weight   [r, in] / [out, r]
    mixlora.layers.{L}.self_attn.{proj}.lora_A.weight / .lora_B.weight         [r, in] / [out, r]

DoRA magnitudes: the authors never store them; their loader sets magnitude = ||W + s*B*A|| per
output row, which makes DoRA a no-op until trained. We do the same when a folder has no
magnitudes, and write the trained ones as `...experts.{e}.magnitude_vector` [out] and
`...self_attn.{proj}.magnitude_vector` [out], keys the authors' loader ignores.
"""
from __future__ import annotations

import ctypes
import json
import os
import pickle
import shutil
import sys
import tempfile
from typing import Dict, Iterable, Tuple

import torch
from torch import Tensor, nn

from .config import MixLoRAConfig
from .lora import LoRALinear
from .model import (attach_patches, build_patches, check_supported, named_adapter_modules,
                    reset_dora_magnitudes, unchanged_on_error)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
MAGNITUDE_SUFFIX = ".magnitude_vector"
_ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME)


# --- key names ------------------------------------------------------------------------------
def _module_state(prefix: str, module: nn.Module) -> Dict[str, Tensor]:
    """The authors' keys of one adapter module -> detached views of its live parameters."""
    if isinstance(module, LoRALinear):
        state = {f"{prefix}.lora_A.weight": module.lora_A.weight.detach(),
                 f"{prefix}.lora_B.weight": module.lora_B.weight.detach()}
        if module.magnitude is not None:
            state[prefix + MAGNITUDE_SUFFIX] = module.magnitude.detach()
        return state
    state = {f"{prefix}.moe_gate.weight": module.router.detach()}
    for proj in module.lora_A:
        A, B = module.lora_A[proj].detach(), module.lora_B[proj].detach()        # [E, r, in], [E, out, r]
        magnitude = module.magnitude[proj].detach() if proj in module.magnitude else None  # [E, out]
        for e in range(module.num_experts):
            expert = f"{prefix}.{proj}.experts.{e}"
            state[f"{expert}.lora_A.weight"] = A[e]
            state[f"{expert}.lora_B.weight"] = B[e]
            if magnitude is not None:
                state[expert + MAGNITUDE_SUFFIX] = magnitude[e]
    return state


def _state_of(modules: Iterable[Tuple[str, nn.Module]]) -> Dict[str, Tensor]:
    state = {}
    for prefix, module in modules:
        state.update(_module_state(prefix, module))
    return state


def _require_adapter(model: nn.Module):
    modules = named_adapter_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no MixLoRA adapter; call inject_mixlora or load_adapter first")
    return modules


def adapter_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The adapter's parameters under the authors' key names: exactly what `save_adapter` writes.

    Values are detached views of the live parameters (like `nn.Module.state_dict()`), not
    copies: an in-place write to one changes the model.
    """
    return _state_of(_require_adapter(model))


# --- loading ----------------------------------------------------------------------------------
def read_adapter_config(path: str) -> MixLoRAConfig:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r}")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        return MixLoRAConfig.from_dict(data)
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from e


def read_adapter_weights(path: str) -> Dict[str, Tensor]:
    """The weights of an adapter folder (safetensors preferred, else the authors' .bin), on the CPU."""
    safetensors_file, bin_file = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(safetensors_file):
        from safetensors.torch import load_file

        return load_file(safetensors_file, device="cpu")
    if not os.path.isfile(bin_file):
        raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {path!r}")
    try:  # weights_only: an adapter is tensors, and a full unpickle could run arbitrary code
        weights = torch.load(bin_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{bin_file}: not a plain dict of tensors (refused by weights_only=True): {e}") from e
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in weights.items()):
        raise ValueError(f"{bin_file}: expected a dict of str -> Tensor, got {type(weights).__name__}")
    return weights


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _copy_weights(modules, weights: Dict[str, Tensor], source: str) -> None:
    """Checks `weights` against the modules' keys and shapes, then copies them in; all or nothing.

    DoRA magnitudes may be absent as a whole (the authors' files): they are then recomputed
    from the loaded LoRA weights, as the authors' loader does.
    """
    modules = list(modules)
    expected = _state_of(modules)
    magnitudes = {k for k in expected if k.endswith(MAGNITUDE_SUFFIX)}
    required = set(expected) - (magnitudes if magnitudes.isdisjoint(weights) else set())
    missing = required - set(weights)
    unexpected = set(weights) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {_listing(unexpected)}")
    bad = [f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
           for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    bad += [f"{k} has dtype {weights[k].dtype} (expected floating point)"
            for k in expected if k in weights and not weights[k].is_floating_point()]
    if bad:
        problems.append(f"{len(bad)} mis-shaped or mistyped tensors: {_listing(bad)}")
    if problems:
        raise ValueError(f"{source}: the adapter weights do not fit this model and config; nothing was loaded. "
                         + "; ".join(problems))
    with torch.no_grad():
        for key, live in expected.items():
            if key in weights:
                live.copy_(weights[key])
        if magnitudes.isdisjoint(weights):
            for _, module in modules:
                reset_dora_magnitudes(module)


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Injects MixLoRA into a fresh `model` and loads the adapter folder `path` into it.

    Reads folders written by `save_adapter` or by the authors' tools (`adapter_model.bin`,
    loaded with `weights_only=True`). Missing, unexpected or mis-shaped tensors raise a
    ValueError naming them, and the model is then left unpatched. Returns `model`.
    """
    config = read_adapter_config(path)
    weights = read_adapter_weights(path)
    check_supported(model)
    with unchanged_on_error(model):
        patches = build_patches(model, config)
        _copy_weights([(p.prefix, p.module) for p in patches], weights, path)
        attach_patches(model, config, patches)
    return model


def restore_adapter_weights(model: nn.Module, path: str) -> nn.Module:
    """Loads the weights of adapter folder `path` into an already patched `model` (e.g. to resume training).

    The folder must match the model's adapter (same keys and shapes); its config is not re-read.
    """
    _copy_weights(_require_adapter(model), read_adapter_weights(path), path)
    return model


# --- saving -----------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str, safe_serialization: bool = True) -> None:
    """Writes `adapter_config.json` and the weights (`adapter_model.safetensors`, or with
    `safe_serialization=False` the authors' `adapter_model.bin`) to the folder `path`.

    The folder is written next to `path` under a temporary name and swapped into place, so a
    crash mid-save leaves the previous adapter intact. Other files already in `path` are kept.
    """
    modules = _require_adapter(model)
    config = getattr(model, "mixlora_config", None)
    if not isinstance(config, MixLoRAConfig):
        raise ValueError("model.mixlora_config is missing; patch the model with inject_mixlora or load_adapter")
    # Own, contiguous CPU copies: views of one stacked parameter share storage, which safetensors refuses.
    tensors = {k: v.to("cpu", copy=True, memory_format=torch.contiguous_format)
               for k, v in _state_of(modules).items()}

    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"save_adapter: {path!r} exists and is not a folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.saving-", dir=parent)
    try:
        _write_file(os.path.join(staging, CONFIG_NAME),
                    lambda f: f.write(json.dumps(config.to_dict(), indent=2).encode("utf-8")))
        if safe_serialization:
            from safetensors.torch import save

            _write_file(os.path.join(staging, SAFETENSORS_NAME),
                        lambda f: f.write(save(tensors, metadata={"format": "pt"})))
        else:
            _write_file(os.path.join(staging, BIN_NAME), lambda f: torch.save(tensors, f))
        if os.path.isdir(path):
            _carry_over(path, staging)
        _swap_into_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # by now the previous folder, a partial one, or nothing


def _write_file(file: str, write) -> None:
    with open(file, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _carry_over(old: str, new: str) -> None:
    """Hard-links (or copies) the files of `old` that are not adapter files into `new`."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in os.scandir(old):
        if entry.name in _ADAPTER_FILES:
            continue
        dst = os.path.join(new, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry.path, dst)


def _swap_into_place(staging: str, path: str) -> None:
    """Makes `staging` appear at `path`; afterwards `staging` holds the previous folder, if any."""
    if not os.path.exists(path):
        os.rename(staging, path)
        return
    if _exchange(staging, path):
        return
    # No atomic exchange here: move the old folder aside first, so that at every moment either
    # `path` or `staging` holds a complete adapter.
    aside = staging + ".previous"
    os.rename(path, aside)
    os.rename(staging, path)
    os.rename(aside, staging)


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
