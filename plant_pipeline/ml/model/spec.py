"""Where the model comes from and how it is loaded: one ModelSpec shared by every step of the pipeline.

Hub ids and local folders load through ``AutoProcessor`` / ``LlavaForConditionalGeneration.from_pretrained``;
the name ``tiny-random-llava`` is first built locally (see tiny.py) and then loaded the same way. A hub id is
checked first (hub.py), so an unreachable hub costs a second and one message instead of minutes of retries.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plant_pipeline.ml.device import DEVICE_TYPES, DevicePolicy, policy_of
from plant_pipeline.ml.errors import UsageError
from plant_pipeline.ml.model import hub
from plant_pipeline.ml.model.tiny import TINY_MODEL_NAME, build_tiny_llava

logger = logging.getLogger(__name__)

DEFAULT_REAL_MODEL = "llava-hf/llava-interleave-qwen-0.5b-hf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelConfigError(UsageError):
    """A model setting that cannot work on this machine; raised before any work starts."""


def resolve_device(preference: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as err:
        raise ModelConfigError(f"device must be auto, {', '.join(DEVICE_TYPES)}; got {preference!r}") from err
    if device.type not in DEVICE_TYPES:
        raise ModelConfigError(f"device must be auto, {', '.join(DEVICE_TYPES)}; got {preference!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError("device 'cuda' was asked for but no CUDA GPU is visible; use device='auto' or 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelConfigError("device 'mps' was asked for but MPS is not available; use device='auto' or 'cpu'")
    return device


def resolve_dtype(preference: str, device: torch.device | DevicePolicy) -> torch.dtype:
    """'auto': the device's choice (DevicePolicy.auto_dtype); an explicit dtype the device cannot run is an error."""
    policy = policy_of(device)
    if preference == "auto":
        return policy.auto_dtype
    if preference not in DTYPES:
        raise ModelConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {preference!r}")
    dtype = DTYPES[preference]
    if dtype == torch.bfloat16 and not policy.allows_bf16:
        raise ModelConfigError(f"bfloat16 is not supported on this {policy.type} device; use dtype='float16' or 'auto'")
    return dtype


def model_slug(model_name: str) -> str:
    """A folder name for a model id or path: 'llava-hf/llava-1.5-7b-hf' -> 'llava-hf--llava-1.5-7b-hf'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model_name.strip("/")).strip("-") or "model"


@dataclass
class ModelSpec:
    """Which model to use and how to load it."""

    model_name: str = field(default=TINY_MODEL_NAME, metadata={"help": "Hub id, local folder, or 'tiny-random-llava'."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cuda, mps or cpu."})
    local_files_only: bool = field(default=False, metadata={"help": "Never contact the hub."})
    models_dir: str = field(default="data/models", metadata={"help": "Where the tiny model is built."})

    @property
    def slug(self) -> str:
        return model_slug(self.model_name)

    def source(self) -> str:
        """The path or hub id that from_pretrained receives; builds the tiny model on first use."""
        if self.model_name == TINY_MODEL_NAME:
            return str(build_tiny_llava(Path(self.models_dir) / TINY_MODEL_NAME))
        return str(Path(self.model_name).expanduser()) if self.model_name.startswith("~") else self.model_name

    def _is_hub_id(self) -> bool:
        """'org/name' or 'name'; anything else (an absolute, relative or home path, or a deeper one) is a folder."""
        name = self.model_name
        if name == TINY_MODEL_NAME or Path(name).expanduser().is_dir():
            return False
        if name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
            raise ModelConfigError(
                f"model {name!r} looks like a folder, but there is no such folder (working directory {Path.cwd()}); "
                "set PLANT_PIPELINE_MODEL to a folder holding config.json and the weights, or to a hub id"
            )
        return True

    def _local_files_only(self) -> bool:
        """local_files_only for from_pretrained: True where the model must come from the cache; raises
        ModelConfigError, naming the model and the fixes, where neither the hub nor the cache can serve it."""
        if not self._is_hub_id():
            return self.local_files_only
        name, revision = self.model_name, self.revision
        at = f" at revision {revision}" if revision else ""
        if self.local_files_only or hub.offline_mode():
            if hub.is_cached(name, revision):
                return True
            why = "local_files_only is set" if self.local_files_only else "HF_HUB_OFFLINE=1 is set"
            raise ModelConfigError(
                f"model {name}{at} is not in the Hugging Face cache ({hub.cache_dir()}) and {why}, so it cannot "
                f"be downloaded. {hub.offline_fixes(name)}"
            )
        answer = hub.probe(name, revision)
        if answer.problem is None:
            return False
        if not answer.reachable and hub.is_cached(name, revision):
            logger.warning("the Hugging Face hub (%s) cannot be reached (%s); loading %s from the cache %s",
                           hub.endpoint(), answer.problem, name, hub.cache_dir())
            return True
        if not answer.reachable:
            raise ModelConfigError(
                f"model {name}{at} cannot be loaded: the Hugging Face hub at {hub.endpoint()} cannot be reached "
                f"({answer.problem}) and the model is not in the cache ({hub.cache_dir()}). {hub.offline_fixes(name)}"
            )
        raise ModelConfigError(f"model {name}{at} cannot be loaded from {hub.endpoint()}: {answer.problem}")

    def pretrained_kwargs(self) -> dict:
        """``revision`` and ``local_files_only`` for every from_pretrained of this model (config, processor,
        weights, in any process), once the hub or the cache is known to serve it; else ModelConfigError, at once."""
        return {"revision": self.revision, "local_files_only": self._local_files_only()}

    def _pretrained(self, load, checked: dict, **kwargs):
        """``load(source, ...)`` with the checked kwargs; a cache that lacks some of the files is one message."""
        try:
            return load(self.source(), **checked, **kwargs)
        except OSError as err:
            if not (checked["local_files_only"] and self._is_hub_id()):
                raise
            raise ModelConfigError(
                f"model {self.model_name} is only partly in the Hugging Face cache ({hub.cache_dir()}): {err} "
                f"{hub.offline_fixes(self.model_name)}"
            ) from err

    def load_processor(self):
        checked = self.pretrained_kwargs()  # before importing transformers (seconds): a model it lacks fails at once
        from transformers import AutoProcessor

        return self._pretrained(AutoProcessor.from_pretrained, checked)

    def load_model(self, *, device: torch.device | None = None, dtype: torch.dtype | None = None):
        checked = self.pretrained_kwargs()
        from transformers import LlavaForConditionalGeneration

        device = device or resolve_device(self.device)
        dtype = dtype or resolve_dtype(self.dtype, device)
        model = self._pretrained(LlavaForConditionalGeneration.from_pretrained, checked, dtype=dtype)
        return model.to(device)
