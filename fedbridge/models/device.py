"""Where a model runs and in which precision: one setting per role (``device.server``, ``device.silo``, a SuperNode's
node config ``device``), resolved where the model is loaded, since the server and each silo may be different
machines."""

from __future__ import annotations

import re

import torch

from fedbridge.errors import ConfigError

DEVICE_SETTING = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(setting: str, key: str = "device") -> torch.device:
    """``auto``: the first CUDA GPU torch sees, else the CPU; ``cpu``; ``cuda`` or ``cuda:N``, which must exist."""
    if not DEVICE_SETTING.fullmatch(setting):
        raise ConfigError(f"{key}='{setting}' is not a device: use auto, cpu, cuda or cuda:<index>.")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={setting}, but torch sees no CUDA device on this machine (a CPU build of torch, "
                              f"no driver, or no GPU given to this process); use {key}=auto or cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={setting}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    return device


def inference_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 for frozen models on a GPU that supports it (half the memory and bandwidth of float32, the range
    of float32); float32 on the CPU, where bfloat16 matmuls are slower, and for anything that trains."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
