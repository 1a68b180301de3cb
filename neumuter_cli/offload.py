"""Weights that accelerate keeps outside the model (``--device-map auto`` with ``--max-memory``).

With a device map, accelerate may offload modules that do not fit: their parameters sit on the
"meta" device and a hook (``module._hf_hook``) brings the real values, from CPU memory or from
the checkpoint's own files on disk, for each forward pass and drops them afterwards. Gates work
unchanged (the forward pre-hook on a down-projection sees its input as usual, and the gradient
reaches it through the weight the hook loaded for that pass), but reading a weight (the
fingerprint) or changing it (apply's fold, measure's quantisation round trip) has to go through
the hook's ``weights_map``. A changed weight is kept in memory, in the state dict of that map
(checked before its files), where the next forward pass and ``save_pretrained`` find it; the
checkpoint files it reads from are never written.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import NeumuterError
from .errors import SettingsMessage

if TYPE_CHECKING:
    import torch
    from torch import nn

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_max_memory(spec: str) -> dict:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` → ``{0: bytes, 1: bytes, "cpu": bytes}``: accelerate's
    ``max_memory``, the most each device may hold of the model (GPU index, ``cpu`` or ``mps``;
    what fits nowhere goes to disk). Sizes in bytes or with a unit: KB, MB, GB, TB (powers of
    1000) or KiB, MiB, GiB, TiB (powers of 1024)."""
    limits: dict = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        device, sep, size = part.partition("=")
        device = device.strip().lower()
        match = _SIZE.match(size)
        if not sep or not match or match.group(2).upper() not in UNITS:
            raise NeumuterError(f"{part.strip()!r} is not DEVICE=SIZE (e.g. 0=20GiB or cpu=64GB)")
        if not (device.isdigit() or device in ("cpu", "mps")):
            raise NeumuterError(f"{device!r} is not a device: a GPU number, cpu or mps")
        key = int(device) if device.isdigit() else device
        if key in limits:
            raise NeumuterError(f"device {device} is given twice")
        limits[key] = int(float(match.group(1)) * UNITS[match.group(2).upper()])
    if not limits:
        raise NeumuterError("no DEVICE=SIZE given (e.g. 0=20GiB,cpu=64GB)")
    return limits


def is_offloaded(tensor: "torch.Tensor") -> bool:
    return tensor.device.type == "meta"


def _hooks(module: "nn.Module") -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])        # a SequentialHook holds several


def _weights_map(module: "nn.Module"):
    for hook in _hooks(module):
        if getattr(hook, "weights_map", None) is not None:
            return hook.weights_map
    return None


def _resolve(weights_map, key: str):
    """The mapping that really holds ``key`` (under prefixes of the module path), and its key there."""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):
        key = f"{weights_map.prefix}{key}"
        weights_map = weights_map.dataset
    return weights_map, key


def _owner(model: "nn.Module", name: str) -> tuple["nn.Module", str]:
    """The innermost module on ``name``'s path whose hook holds it, and the name under it."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut]))
        if _weights_map(module) is not None:
            return module, ".".join(parts[cut:])
    raise NeumuterError(f"{name} is offloaded (on the meta device) but no accelerate hook holds its values")


def read(module: "nn.Module", name: str = "weight") -> "torch.Tensor":
    """The values of ``module``'s parameter ``name``: the parameter itself, or when it is
    offloaded, what the hook would load (on the CPU or the device it is stored on)."""
    tensor = getattr(module, name)
    if not is_offloaded(tensor):
        return tensor
    weights_map = _weights_map(module)
    if weights_map is None:
        raise NeumuterError(f"a {type(module).__name__} weight is offloaded but no accelerate hook holds its values")
    return weights_map[name]


def write(module: "nn.Module", name: str, value: "torch.Tensor") -> None:
    """Give the offloaded parameter ``name`` of ``module`` new values (kept in memory, in the
    hook's state dict, which accelerate reads before any file)."""
    mapping, key = _resolve(_weights_map(module), name)
    state = getattr(mapping, "state_dict", None)
    if isinstance(state, dict):
        state[key] = value.detach().to("cpu")
        keys = getattr(mapping, "all_keys", None)
        if isinstance(keys, list) and key not in keys:
            keys.append(key)
    elif isinstance(mapping, dict):
        mapping[key] = value.detach().to("cpu")
    else:
        raise SettingsMessage("cannot change an offloaded weight held in a {kind}: load the model without "
                              "{max_memory}", kind=type(mapping).__name__)


def stored(model: "nn.Module", name: str) -> tuple["torch.Tensor", tuple]:
    """An offloaded entry of ``model.state_dict()``: its values, and a key that is the same for
    two names of one stored tensor (tied weights read from the same place)."""
    module, local = _owner(model, name)
    mapping, key = _resolve(_weights_map(module), local)
    state = getattr(mapping, "state_dict", None)
    if isinstance(state, dict) and key in state:
        value = state[key]
        return value, ("memory", id(mapping), value.data_ptr(), tuple(value.shape))
    info = getattr(mapping, "index", {}).get(key)
    if isinstance(info, dict) and info.get("safetensors_file"):
        source = ("file", info["safetensors_file"], info.get("weight_name", key))
    else:
        source = ("offload", id(mapping), key)
    return _weights_map(module)[local], source


def execution_device(module: "nn.Module"):
    """Where accelerate runs ``module`` (its hook's execution device), or None."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            import torch

            return torch.device(device) if not isinstance(device, torch.device) else device
    return None


__all__ = ["parse_max_memory", "is_offloaded", "read", "write", "stored", "execution_device"]
