"""What a training run reports while it runs: peak memory (RSS, CUDA, MPS) and a progress callback with
speed and ETA."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable

import torch

from plant_pipeline.ml.device import DevicePolicy, policy_of

logger = logging.getLogger(__name__)


def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    # ru_maxrss: kilobytes on Linux, bytes on macOS; the lifetime peak, so only a fallback.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MemoryMonitor:
    """Peak RSS (sampled) and peak device memory (CUDA's allocator peak, MPS's driver memory sampled) over a
    training run; what each device can report is DevicePolicy's."""

    def __init__(self, device: torch.device, policy: DevicePolicy | None = None):
        self.device = device
        self.policy = policy or policy_of(device)
        self.peak_rss = 0
        self.peak_device = 0
        self.policy.reset_peak_memory(device)
        self.sample()

    def sample(self) -> None:
        rss = _rss_bytes()
        self.peak_rss = max(self.peak_rss, rss if rss is not None else _max_rss_bytes())
        if self.policy.device_memory_bytes is not None:
            self.peak_device = max(self.peak_device, self.policy.device_memory_bytes(self.device))

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss / 2**20

    def _peak_device_mb(self, device_type: str) -> float | None:
        if self.policy.type != device_type or self.policy.device_memory_bytes is None:
            return None
        self.sample()  # up to now: CUDA's counter also holds the peak since the last sample
        return self.peak_device / 2**20

    @property
    def peak_cuda_mb(self) -> float | None:
        return self._peak_device_mb("cuda")

    @property
    def peak_mps_mb(self) -> float | None:
        return self._peak_device_mb("mps")


def step_label(step: int, max_steps: int) -> str:
    """``step 20/400``; step 0 is the evaluation of the untrained model."""
    return f"step {step}/{max_steps}" + (" (before training)" if step == 0 else "")


def make_progress_callback(on_log: Callable[[dict], None] | None, memory: MemoryMonitor, global_batch: int):
    """A TrainerCallback reporting progress to ``on_log`` and the logger; its ``samples_per_second`` counts
    training steps only (built on call: transformers loads only when training)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Forwards every log event, with speed and ETA, to ``on_log``; times steps without eval and saves."""

        def __init__(self):
            self.started_at: float | None = None
            self.first_step = 0
            self.step_seconds = 0.0
            self.steps_timed = 0
            self._interval_start: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started_at = self._interval_start = time.time()
            self.first_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            if self._interval_start is not None:
                self.step_seconds += now - self._interval_start
                self.steps_timed += 1
            self._interval_start = now
            memory.sample()
            if state.global_step >= state.max_steps:
                control.should_log = True  # the last step's loss, even off the logging_steps grid

        def _after_side_work(self):
            # Evaluation and checkpointing are not training throughput: restart the step clock after them.
            if self._interval_start is not None:
                self._interval_start = time.time()

        def on_evaluate(self, args, state, control, **kwargs):
            memory.sample()
            self._after_side_work()

        def on_save(self, args, state, control, **kwargs):
            self._after_side_work()

        @property
        def samples_per_second(self) -> float:
            return self.steps_timed * global_batch / self.step_seconds if self.step_seconds > 0 else 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            memory.sample()
            if not state.is_world_process_zero:
                return
            record = dict(logs or {})
            # The evaluation before training runs before the state knows its plan (max_steps 0): the arguments do.
            max_steps = state.max_steps or max(args.max_steps, 0)
            record.update(step=state.global_step, max_steps=max_steps, rss_mb=round(memory.peak_rss_mb, 1))
            if self.started_at is not None and state.global_step > self.first_step:
                elapsed = time.time() - self.started_at
                per_step = elapsed / (state.global_step - self.first_step)
                record["samples_per_second"] = round(self.samples_per_second, 3)
                record["eta_seconds"] = round(per_step * max(0, state.max_steps - state.global_step), 1)
            logger.info("%s %s", step_label(state.global_step, max_steps),
                        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                                 if k not in ("step", "max_steps")))
            if on_log is not None:
                on_log(record)

    return ProgressCallback()

