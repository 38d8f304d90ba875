"""The device policy (ml/device.py): each device's decisions, checked without the hardware, and the call
sites that follow them (dtype, precision, compile refusal, loader workers, pinned memory, read-ahead,
cache emptying, memory reporting)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from plant_pipeline.ml.device import MPS_COMPILE_REFUSAL, policy_for, policy_of
from plant_pipeline.ml.model.spec import ModelConfigError, resolve_device, resolve_dtype
from plant_pipeline.ml.training.build import streaming_args
from plant_pipeline.ml.training.config import (
    TrainConfig,
    TrainConfigError,
    check_device_settings,
    loader_workers,
    resolve_precision,
)
from plant_pipeline.ml.training.monitor import MemoryMonitor

FIELDS = ("auto_dtype", "allows_bf16", "trains_fp16", "pin_memory", "loader_workers", "read_ahead_thread",
          "normalize_pixels_on_device", "use_cpu")
DECISIONS = {
    # (device type, bf16 supported): the decisions in FIELDS' order
    ("cuda", True): (torch.bfloat16, True, True, True, 0, True, True, False),
    ("cuda", False): (torch.float32, False, True, True, 0, True, True, False),
    ("mps", True): (torch.bfloat16, True, True, False, 2, False, False, False),
    ("mps", False): (torch.float16, False, True, False, 2, False, False, False),
    ("cpu", False): (torch.float32, True, False, False, 2, False, False, True),
}


@pytest.mark.parametrize(("device_type", "bf16"), list(DECISIONS))
def test_each_device_decides_dtype_memory_and_loading(device_type, bf16):
    policy = policy_for(device_type, bf16_supported=bf16)
    assert tuple(getattr(policy, name) for name in FIELDS) == DECISIONS[device_type, bf16]
    assert (policy.compile_refusal is not None) == (device_type == "mps")
    # Only the GPUs report device memory; only MPS samples what its driver holds instead of a peak counter.
    assert (policy.device_memory_bytes is None) == (device_type == "cpu")


def test_unknown_device_type_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"one of cuda, mps, cpu; got 'xpu'"):
        policy_for("xpu")
    with pytest.raises(ModelConfigError, match=r"device must be auto, cuda, mps, cpu; got 'xpu'"):
        resolve_device("xpu")
    with pytest.raises(ModelConfigError, match=r"got 'gpu0'"):
        resolve_device("gpu0")


def test_this_machines_policy_is_probed_and_a_policy_passes_through():
    assert policy_of("cpu") == policy_for("cpu")
    mps = policy_for("mps")
    assert policy_of(mps) is mps


def test_dtype_follows_the_policy():
    old_mac, new_mac = policy_for("mps", bf16_supported=False), policy_for("mps", bf16_supported=True)
    assert resolve_dtype("auto", old_mac) == torch.float16
    assert resolve_dtype("auto", new_mac) == torch.bfloat16
    assert resolve_dtype("float32", old_mac) == torch.float32
    with pytest.raises(ModelConfigError, match="bfloat16 is not supported on this mps device"):
        resolve_dtype("bfloat16", old_mac)
    assert resolve_dtype("bfloat16", policy_for("cpu")) == torch.bfloat16  # emulated, but it trains


def test_precision_refuses_fp16_training_on_the_cpu_only():
    fp16 = TrainConfig(dtype="float16")
    assert resolve_precision(fp16, policy_for("mps")) == torch.float16
    assert resolve_precision(fp16, policy_for("cuda", bf16_supported=True)) == torch.float16
    with pytest.raises(TrainConfigError, match="float16 training needs a GPU .*not cpu"):
        resolve_precision(fp16, policy_for("cpu"))
    with pytest.raises(TrainConfigError, match="bfloat16 is not supported on this cuda device"):
        resolve_precision(TrainConfig(dtype="bfloat16"), policy_for("cuda", bf16_supported=False))


def test_compile_blocks_is_refused_on_mps_with_advice():
    compiled = TrainConfig(compile_blocks=True)
    with pytest.raises(TrainConfigError, match="set compile_blocks=False on this Mac") as err:
        check_device_settings(compiled, policy_for("mps", bf16_supported=True))
    assert str(err.value) == MPS_COMPILE_REFUSAL
    check_device_settings(compiled, policy_for("cuda"))
    check_device_settings(compiled, policy_for("cpu"))
    check_device_settings(TrainConfig(), policy_for("mps"))


def test_loader_workers_and_pinned_memory_follow_the_policy():
    auto, two = TrainConfig(), TrainConfig(dataloader_num_workers=1)
    assert [loader_workers(auto, policy_for(t)) for t in ("cuda", "mps", "cpu")] == [0, 2, 2]
    assert loader_workers(two, policy_for("cuda")) == 1, "an explicit setting wins"
    assert streaming_args(auto, policy_for("cuda"), 0)["dataloader_pin_memory"] is True
    assert streaming_args(auto, policy_for("mps"), 2)["dataloader_pin_memory"] is False


class _Numbers(IterableDataset):
    def __iter__(self):
        return iter(range(4))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from transformers import TrainingArguments

    from plant_pipeline.ml.training.trainer import CustomTrainer

    args = TrainingArguments(str(tmp_path_factory.mktemp("trainer")), report_to="none", use_cpu=True, max_steps=1,
                             dataloader_num_workers=0, disable_tqdm=True)
    return CustomTrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=_Numbers(),
                         data_collator=lambda batch: batch, memory_cleanup_steps=5)


def test_trainer_takes_its_policy_from_the_device(trainer):
    assert trainer.device_policy == policy_for("cpu")


@pytest.mark.parametrize(("device_type", "read_ahead", "pinned"), [("cuda", True, True), ("mps", False, False),
                                                                   ("cpu", False, False)])
def test_trainer_loader_reads_ahead_and_pins_as_the_policy_says(trainer, device_type, read_ahead, pinned):
    from plant_pipeline.ml.training.prefetch import PrefetchingDataLoader

    trainer.device_policy = policy_for(device_type)
    trainer.args.dataloader_pin_memory = True  # as streaming_args sets it on CUDA (use_cpu turned it off)
    try:
        loader = trainer._stream_loader(_Numbers(), batch_size=2, num_workers=0, persistent=False)
    finally:
        trainer.device_policy = policy_of(trainer.args.device)
        trainer.args.dataloader_pin_memory = False
    assert isinstance(loader, DataLoader)
    assert isinstance(loader, PrefetchingDataLoader) == read_ahead
    assert loader.pin_memory == pinned


def test_trainer_empties_the_policys_cache_every_cleanup_steps(trainer):
    emptied = []
    trainer.device_policy = dataclasses.replace(policy_for("mps"), empty_cache=emptied.append)
    try:
        for step in (4, 5, 5, 6, 10):
            trainer.state.global_step = step
            trainer._maybe_free_memory()
    finally:
        trainer.device_policy = policy_of(trainer.args.device)
    assert emptied == [trainer.args.device] * 2, "steps 5 and 10, once each"


def test_memory_monitor_samples_mps_driver_memory_as_a_peak():
    readings = iter([100 * 2**20, 300 * 2**20, 200 * 2**20, 150 * 2**20])
    policy = dataclasses.replace(policy_for("mps"), device_memory_bytes=lambda device: next(readings))
    monitor = MemoryMonitor(torch.device("cpu"), policy=policy)  # reads 100 MiB
    monitor.sample()  # 300
    monitor.sample()  # 200
    assert monitor.peak_mps_mb == 300.0  # reads 150 on the way
    assert monitor.peak_cuda_mb is None
    cpu = MemoryMonitor(torch.device("cpu"))
    assert cpu.peak_mps_mb is None and cpu.peak_cuda_mb is None and cpu.peak_rss_mb > 0


def test_build_trainer_refuses_compile_on_mps_before_compiling(trainer, monkeypatch):
    import plant_pipeline.ml.training.config as config_module
    from plant_pipeline.ml.training.build import build_trainer

    compiled = []
    monkeypatch.setattr(config_module, "policy_of", lambda device: policy_for("mps"))
    monkeypatch.setattr("plant_pipeline.ml.training.build.compile_blocks", compiled.append)
    with pytest.raises(TrainConfigError, match="compile_blocks=False"):
        build_trainer(torch.nn.Linear(2, 2), TrainConfig(compile_blocks=True, report_to="none"), trainer.args,
                      data_collator=lambda batch: batch, train_dataset=_Numbers())
    assert compiled == []
