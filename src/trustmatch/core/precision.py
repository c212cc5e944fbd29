"""The device a run uses, and its precision: bfloat16 autocast and channels-last wherever they run natively.

On this project's reference CPU (AVX-512 BF16) a whole WRN-28-2 FixMatch step is 4.7x faster with
bf16 autocast and channels-last than in float32 (benchmarks/step_time.py). A CPU or GPU without
native bf16 would emulate it (slower than float32), so there, and on MPS, float32 stays.
BatchNorm, softmax and losses stay float32 under autocast; models run their head in float32.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trustmatch.core import distributed as dist
from trustmatch.core.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU under torchrun (LOCAL_RANK), else the GPU, MPS or the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return _local_gpu(name)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"config key 'train.device' got {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but MPS is not available here: use train.device=auto or cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible: use train.device=auto or cpu")
        if device.index is None:
            return _local_gpu(name)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"train.device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
            raise UserError(
                f"train.device={name} would put every torchrun process on one GPU: use train.device=cuda or auto"
            )
    return device


def _local_gpu(name: str) -> torch.device:
    """This process's GPU (LOCAL_RANK). More processes on a node than GPUs is refused on every rank (one
    line, before any process group waits for a rank that would die with a CUDA ordinal error)."""
    processes, count = int(os.environ.get("LOCAL_WORLD_SIZE", dist.local_rank() + 1)), torch.cuda.device_count()
    if max(processes, dist.local_rank() + 1) > count:
        raise UserError(
            f"train.device={name}: torchrun started {processes} processes on this node but only {count} CUDA "
            f"device(s) are visible: use --nproc_per_node={count}, or train.device=cpu"
        )
    return torch.device("cuda", dist.local_rank())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (CUDA Ampere+, AVX-512 BF16 or AMX CPUs)."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)  # pre-Ampere emulates: slow
        except TypeError:  # torch < 2.4 counts native support only
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


@dataclass(frozen=True)
class Precision:
    device: torch.device
    amp: bool  # bfloat16 autocast
    channels_last: bool

    @classmethod
    def resolve(cls, device: torch.device, amp: bool, channels_last: bool) -> Precision:
        """What the config asks for, where the device runs it natively (``train.amp=false``: float32)."""
        amp = amp and native_bf16(device)
        return cls(device, amp, channels_last and (device.type == "cuda" or amp))

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    def layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def describe(self) -> str:
        return ("bfloat16 autocast" if self.amp else "float32") + (", channels-last" if self.channels_last else "")
