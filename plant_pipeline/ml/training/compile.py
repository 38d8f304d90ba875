"""Regional torch.compile: each transformer block compiled once, its code shared by every layer like it.

Compiling the whole LLaVA would trace the model's glue too (image-token scatter, masks), recompile when it
changes and take minutes; a decoder layer is the same code 24 times, so one compile serves every layer
(torch's "regional compilation" recipe). Inside a block, inductor fuses what eager PyTorch launches as many
small kernels: RMSNorm, rotary embeddings, SiLU x up, residual adds. Blocks are found by transformers' base
class for them (``GradientCheckpointingLayer``), so vision and text towers of any LLaVA are covered.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

# Sequence lengths are rounded up to this when blocks are compiled and no other multiple is given: batches then
# share a handful of shapes instead of recompiling (or compiling for dynamic shapes) at every new length.
COMPILE_PAD_MULTIPLE = 64


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """``block.compile(**compile_kwargs)`` for every transformer block of ``model``, in place; returns how many.

    ``nn.Module.compile`` keeps parameter names (no ``_orig_mod.`` prefix), so checkpoints and
    ``save_pretrained`` are unchanged. The compile itself happens at each block's first call.
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(**compile_kwargs)
    kinds = sorted({type(block).__name__ for block in blocks})
    logger.info("compiling %d transformer blocks (%s) at their first call", len(blocks), ", ".join(kinds))
    return len(blocks)
