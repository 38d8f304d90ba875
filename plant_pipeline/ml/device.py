"""What differs between CUDA, Apple's MPS and the CPU, decided in one place: ``DevicePolicy``.

``policy_for`` is a pure function of the device type and the few capabilities that must be probed (bf16
support); ``policy_of`` probes them for a real device. Call sites read the policy's fields instead of
testing ``device.type`` themselves, so the Apple path can be read (and tested without a Mac) here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DEVICE_TYPES = ("cuda", "mps", "cpu")

# torch.compile's MPS backend is experimental: kernels missing or slower than eager on the models we train.
MPS_COMPILE_REFUSAL = ("compile_blocks needs CUDA or a CPU (torch.compile's MPS backend is experimental); "
                       "set compile_blocks=False on this Mac")


def _no_op(device: torch.device) -> None:
    return None


def _cuda_empty_cache(device: torch.device) -> None:
    torch.cuda.empty_cache()


def _mps_empty_cache(device: torch.device) -> None:
    torch.mps.empty_cache()


def _cuda_reset_peak(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak_bytes(device: torch.device) -> int:
    # The allocator's own peak since the reset: a sample at any time after it is the run's peak so far.
    return int(torch.cuda.max_memory_allocated(device))


def _mps_driver_bytes(device: torch.device) -> int:
    # MPS has no peak counter: what the Metal driver holds now (the caching allocator included), sampled.
    return int(torch.mps.driver_allocated_memory())


@dataclass(frozen=True)
class DevicePolicy:
    """How this project trains and loads on one kind of device. Build with ``policy_for`` or ``policy_of``."""

    type: str
    bf16_supported: bool
    # dtype="auto": bf16 where the GPU has it, fp16 on an MPS without it (fp32 would double the weights' share
    # of a 16 GB Mac's memory), fp32 on the CPU (bf16 trains there, but slowly) and on a CUDA GPU without bf16
    # (there fp16 is left to an explicit dtype="float16").
    auto_dtype: torch.dtype
    # An explicit bfloat16: refused on a GPU that lacks it; the CPU emulates it.
    allows_bf16: bool
    # float16 training needs a GPU: the CPU's fp16 kernels are missing or slow, and autocast does not use them.
    trains_fp16: bool
    # Pinned host memory only speeds copies to a CUDA device; on MPS (unified memory) and the CPU it only costs.
    pin_memory: bool
    # DataLoader worker processes when dataloader_num_workers is None: 0 on CUDA, where pixels cross as uint8
    # and a read-ahead thread overlaps the step (bench/gpu_train.py), 2 where the step runs in this process's
    # own cores (CPU) or the GPU shares the host's memory (MPS).
    loader_workers: int
    # With no worker processes, a thread reads the next batches while the device runs the step (prefetch.py):
    # only where the step runs asynchronously to the host.
    read_ahead_thread: bool
    # uint8 pixels are expanded to floats on the device (pixels.py) rather than in the collator.
    normalize_pixels_on_device: bool
    # None where compile_blocks may run; else the message that refuses it.
    compile_refusal: str | None
    # Returns the allocator's cached blocks to the device (memory_cleanup_steps).
    empty_cache: Callable[[torch.device], None]
    # Starts the device-memory peak; then device_memory_bytes(device) samples it (None: no device memory).
    reset_peak_memory: Callable[[torch.device], None]
    device_memory_bytes: Callable[[torch.device], int] | None

    @property
    def use_cpu(self) -> bool:
        return self.type == "cpu"


def policy_for(device_type: str, *, bf16_supported: bool = False) -> DevicePolicy:
    """The policy for ``device_type`` ("cuda", "mps" or "cpu") given whether its kernels support bfloat16.

    Pure: nothing is probed, so every device's decisions can be tested on any machine.
    """
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device type must be one of {', '.join(DEVICE_TYPES)}; got {device_type!r}")
    if device_type == "cuda":
        return DevicePolicy(
            type="cuda", bf16_supported=bf16_supported,
            auto_dtype=torch.bfloat16 if bf16_supported else torch.float32, allows_bf16=bf16_supported,
            trains_fp16=True, pin_memory=True, loader_workers=0, read_ahead_thread=True,
            normalize_pixels_on_device=True, compile_refusal=None, empty_cache=_cuda_empty_cache,
            reset_peak_memory=_cuda_reset_peak, device_memory_bytes=_cuda_peak_bytes)
    if device_type == "mps":
        return DevicePolicy(
            type="mps", bf16_supported=bf16_supported,
            auto_dtype=torch.bfloat16 if bf16_supported else torch.float16, allows_bf16=bf16_supported,
            trains_fp16=True, pin_memory=False, loader_workers=2, read_ahead_thread=False,
            normalize_pixels_on_device=False, compile_refusal=MPS_COMPILE_REFUSAL, empty_cache=_mps_empty_cache,
            reset_peak_memory=_no_op, device_memory_bytes=_mps_driver_bytes)
    return DevicePolicy(
        type="cpu", bf16_supported=bf16_supported, auto_dtype=torch.float32, allows_bf16=True,
        trains_fp16=False, pin_memory=False, loader_workers=2, read_ahead_thread=False,
        normalize_pixels_on_device=False, compile_refusal=None, empty_cache=_no_op,
        reset_peak_memory=_no_op, device_memory_bytes=None)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device``'s kernels run bfloat16 (probed; False on the CPU, which only emulates it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # bf16 matmuls on MPS need macOS 14+.
    return device.type == "mps" and torch.backends.mps.is_macos_or_newer(14, 0)


def policy_of(device: torch.device | str | DevicePolicy) -> DevicePolicy:
    """The policy for a real ``device``, its capabilities probed on this machine (a policy is returned as is,
    so functions can take either)."""
    if isinstance(device, DevicePolicy):
        return device
    device = torch.device(device)
    return policy_for(device.type, bf16_supported=bf16_supported(device))
