"""A training run's result folder: the weights (adapter, merged or full model), processor, loss curve and
RESULT_META, written on the side and swapped into place; the finished-result check; load_trained."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.files import replace_folder
from plant_pipeline.ml.model.spec import ModelSpec, resolve_device, resolve_dtype
from plant_pipeline.ml.training.checkpoints import WEIGHT_FILES
from plant_pipeline.ml.training.config import TrainConfig, json_safe

RESULT_META = "training_meta.json"
LOSS_CURVE = "loss_curve.png"


@dataclass
class TrainResult:
    """What train() returns (and the cli writes as JSON); RESULT_META in the result folder holds the same."""

    model_path: str
    steps: int
    max_steps: int
    final_train_loss: float | None
    final_validation_loss: float
    initial_validation_loss: float
    samples_per_second: float
    peak_memory_mb: float  # peak resident set size of the training process, sampled during the run
    peak_cuda_memory_mb: float | None
    peak_mps_memory_mb: float | None
    device: str
    dtype: str
    trainable_params: int
    total_params: int
    log_history: list[dict]
    resumed_from_step: int | None
    seconds: float
    loss_curve_path: str | None
    world_size: int = 1
    stopped_early: bool = False  # early stopping ended the run before max_steps, at ``steps``
    stop_reason: str | None = None
    best_step: int | None = None  # keep="best": the step whose checkpoint the saved weights are (None: keep="last")
    best_eval_loss: float | None = None  # its validation loss
    mlflow_run_id: str | None = None  # report_to="mlflow": the MLflow run that holds this training's figures

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plot_loss_curve(log_history: list[dict], path: Path) -> Path:
    """Train loss and validation loss against step, as a PNG (Agg canvas: no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    val = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


def save_result(trainer, processor, config: TrainConfig, model_spec: ModelSpec, output_dir: Path,
                log_history: list[dict], summary: dict, is_main: bool) -> tuple[Path | None, str]:
    """Called on every rank: under FSDP / ZeRO-3 each rank holds a shard, and Trainer.save_model gathers the
    full weights to rank 0, which alone writes. The folder is swapped into place only when complete (not with
    files.staging_folder: its folder has a random name, and every rank must write to the same path)."""
    tmp = output_dir.parent / f".{output_dir.name}.saving"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    curve, kind = None, "lora_adapter" if config.use_lora else "full"
    try:
        if config.use_lora and config.merge_lora:  # unsharded only: refused before training under FSDP/DeepSpeed
            kind = "merged"
            if is_main:
                trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(tmp)
        else:
            trainer.save_model(str(tmp))
        if is_main:
            # The Trainer pickles its TrainingArguments beside the weights; the settings are in RESULT_META.
            (tmp / "training_args.bin").unlink(missing_ok=True)
            processor.save_pretrained(tmp)
            curve = plot_loss_curve(log_history, tmp / LOSS_CURVE)
            meta = {"kind": kind, "model_spec": asdict(model_spec), "train_config": asdict(config), **summary,
                    "log_history": log_history}
            (tmp / RESULT_META).write_text(json.dumps(json_safe(meta), indent=2, sort_keys=True))
            replace_folder(tmp, output_dir)
    finally:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return (output_dir / curve.name if curve else None), kind


def read_result_meta(model_path: str | Path) -> dict[str, Any] | None:
    """The RESULT_META object of a result folder, or None where there is none; UsageError when it is damaged."""
    path = Path(model_path) / RESULT_META
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"{path} cannot be read as JSON ({err}); the model folder is damaged, train or promote it "
                         "again") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object; got {type(data).__name__}")
    return data


def finished_result(output_dir: Path, identity: dict) -> TrainResult | None:
    """The TrainResult already in ``output_dir`` when it was made with exactly ``identity`` and ran to its end
    (max_steps, or an early stop), else None.

    Reported as resumed at its last step, as a re-run that finds only the final checkpoint reports it."""
    try:
        meta = json.loads((output_dir / RESULT_META).read_text())
    except (OSError, ValueError):
        return None
    weights = [output_dir / n for n in (*WEIGHT_FILES, "model.safetensors.index.json")]
    if (not isinstance(meta, dict) or meta.get("run_identity") != identity
            or (meta.get("steps") != identity["max_steps"] and not meta.get("stopped_early"))
            or not any(f.is_file() and f.stat().st_size > 0 for f in weights)):
        return None
    curve = output_dir / LOSS_CURVE
    names = {f.name for f in fields(TrainResult)} - {"model_path", "loss_curve_path", "resumed_from_step"}
    try:
        return TrainResult(model_path=str(output_dir), loss_curve_path=str(curve) if curve.is_file() else None,
                           resumed_from_step=meta["steps"], **{name: meta[name] for name in names if name in meta})
    except TypeError:  # metadata of an older layout
        return None


def load_trained(model_path: str | Path, model_spec: ModelSpec, device: torch.device | str | None = None):
    """(model, processor) from a train() result: an adapter is applied to the spec's base model, a merged or
    fully fine-tuned model loads on its own. The model is in eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_path = Path(model_path)
    device = torch.device(device) if device is not None else resolve_device(model_spec.device)
    dtype = resolve_dtype(model_spec.dtype, device)
    processor = AutoProcessor.from_pretrained(model_path)
    if (model_path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = model_spec.load_model(device=device, dtype=dtype)
        model = PeftModel.from_pretrained(base, model_path).to(device)
    elif (model_path / "config.json").is_file():
        model = LlavaForConditionalGeneration.from_pretrained(model_path, dtype=dtype).to(device)
    else:
        raise FileNotFoundError(f"{model_path} holds neither adapter_config.json nor config.json; run train() first")
    model.eval()
    return model, processor
