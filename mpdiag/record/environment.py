"""The facts of the environment that explain numerics, as JSON-compatible data for a run."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from mpdiag.core.errors import MpdiagError

__all__ = ["describe", "autocast_dtype", "check_autocast"]


def describe(model: nn.Module, formats: tuple[str, ...], scaler: Any = None) -> dict[str, Any]:
    """torch version, device, matmul precision and TF32 flags, anomaly mode, GradScaler settings, formats."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(device),
        "device_name": _device_name(device),
        **_precision_flags(),
        "anomaly_mode": bool(torch.is_anomaly_enabled()),
        "bf16_supported": _bf16_supported(device),
        "formats": list(formats),
        "autocast_dtype": None,
    }
    if scaler is not None:
        env["grad_scaler"] = {
            "enabled": bool(scaler.is_enabled()),
            "init_scale": float(scaler.get_scale()) if scaler.is_enabled() else None,
            "growth_factor": float(scaler.get_growth_factor()),
            "backoff_factor": float(scaler.get_backoff_factor()),
            "growth_interval": int(scaler.get_growth_interval()),
        }
    return env


#: torch >= 2.9's per-backend fp32 precision settings, by the names the run keeps them under.
_FP32_PRECISIONS = {"all": (), "cuda_matmul": ("cuda", "matmul"), "cudnn_conv": ("cudnn", "conv"),
                    "cudnn_rnn": ("cudnn", "rnn"), "mkldnn_matmul": ("mkldnn", "matmul"),
                    "mkldnn_conv": ("mkldnn", "conv")}  # fmt: skip


def _precision_flags() -> dict[str, Any]:
    """The matmul precision and TF32 flags. Once torch >= 2.9's per-backend settings differ, the legacy
    getters raise (a "mix of the legacy and new APIs"): those read None, and the settings are kept too."""
    flags: dict[str, Any] = {}
    legacy = {
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        "cuda_matmul_allow_tf32": lambda: bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": lambda: bool(torch.backends.cudnn.allow_tf32),
    }
    for key, read in legacy.items():
        try:
            flags[key] = read()
        except RuntimeError:
            flags[key] = None
    if hasattr(torch.backends, "fp32_precision"):
        precisions = {}
        for key, path in _FP32_PRECISIONS.items():
            owner: Any = torch.backends
            for part in path:
                owner = getattr(owner, part, None)
            if owner is not None and hasattr(owner, "fp32_precision"):
                precisions[key] = owner.fp32_precision
        flags["fp32_precision"] = precisions
    return flags


def autocast_dtype(device_type: str) -> str | None:
    """The autocast dtype active now for ``device_type``, or None when autocast is off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        if not torch.is_autocast_enabled(device_type):
            return None
        return str(torch.get_autocast_dtype(device_type)).replace("torch.", "")
    if device_type == "cpu":
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    else:
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return str(dtype).replace("torch.", "") if enabled else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform

        return platform.processor() or platform.machine()
    return device.type


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return True  # CPUs compute bf16 (emulated where there is no native support)


def check_autocast(device_type: str, dtype: torch.dtype) -> None:
    """Refuse a combination autocast silently ignores (old torch: CPU autocast was bf16 only)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise MpdiagError(f"dtype must be torch.float16 or torch.bfloat16 (an autocast dtype), got {dtype}")
    try:
        with warnings.catch_warnings():  # old torch warns, then disables autocast: reported below
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, dtype=dtype):
                probe = torch.ones(2, 2, device=device_type) @ torch.ones(2, 2, device=device_type)
    except (RuntimeError, AssertionError) as err:
        raise MpdiagError(f"autocast on {device_type!r} is not available here: {err}") from err
    if probe.dtype != dtype:
        raise MpdiagError(
            f"autocast on {device_type!r} does not run matmuls in {dtype} with torch "
            f"{torch.__version__}; replay on another device or with another dtype"
        )
