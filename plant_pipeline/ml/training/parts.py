"""Which parts of a LLaVA train: freezing the vision tower, projector and language model, or wrapping the
language model's linear layers in LoRA adapters."""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from plant_pipeline.ml.model.spec import ModelConfigError, ModelSpec
from plant_pipeline.ml.training.config import TrainConfig, TrainConfigError


def _llava_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    core = getattr(model, "model", model)
    parts = {
        "vision_tower": [getattr(core, "vision_tower", None)],
        "multi_modal_projector": [getattr(core, "multi_modal_projector", None)],
        "language_model": [getattr(core, "language_model", None), getattr(model, "lm_head", None)],
    }
    if any(modules[0] is None for modules in parts.values()):
        raise ModelConfigError(
            f"{type(model).__name__} has no vision_tower / multi_modal_projector / language_model; "
            "expected a LlavaForConditionalGeneration (transformers >= 5)"
        )
    return {name: [m for m in modules if m is not None] for name, modules in parts.items()}


def _language_linear_names(model: nn.Module) -> dict[str, list[str]]:
    """Last name part -> full names of the linear layers inside the language model."""
    names: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".language_model." in f".{name}.":
            names.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return names


def lora_target_regex(targets: list[str]) -> str:
    """A peft ``target_modules`` regex matching these layer names inside the language model only
    (the CLIP vision tower has q_proj/k_proj/v_proj too)."""
    alternatives = "|".join(re.escape(t) for t in targets)
    return rf"(.*\.)?language_model\.(.*\.)?({alternatives})"


def validate_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """TrainConfigError unless every name in ``targets`` matches a linear layer of the language model."""
    available = _language_linear_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise TrainConfigError(
            f"lora_target_modules {missing} match no linear layer of the language model; available: "
            f"{', '.join(sorted(available))}"
        )


def model_skeleton(model_spec: ModelSpec) -> nn.Module:
    """The model's module tree without its weights (meta device): enough to check LoRA targets in seconds."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(model_spec.source(), **model_spec.pretrained_kwargs())
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def configure_trainable(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze parts, or wrap in LoRA adapters; returns the model to train."""
    parts = _llava_parts(model)
    frozen = {"vision_tower": config.freeze_vision_tower, "multi_modal_projector": config.freeze_projector,
              "language_model": config.freeze_language_model}
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # (use_cache stays as it is in the saved config: the loss passes use_cache=False per call.)
    if not config.use_lora:
        for name, modules in parts.items():
            for module in modules:
                module.requires_grad_(not frozen[name])
        return model

    from peft import LoraConfig, get_peft_model

    modules_to_save = [name for name in ("multi_modal_projector", "vision_tower") if not frozen[name]]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_regex(config.lora_target_modules),
        modules_to_save=modules_to_save or None,
        bias="none",
    )
    if config.gradient_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; this keeps the graph connected.
        model.enable_input_require_grads()
    with warnings.catch_warnings():  # peft 0.21 calls a transformers attribute deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    # Trainable copies (LoRA, modules_to_save) in fp32 even over a half-precision base: AdamW and the
    # fp16 grad scaler need fp32 parameters; autocast handles the matmuls.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
