"""Training memory of a CPSL run, estimated without allocating it: the model is built on the meta device (shapes,
no data) and one student forward at the run's batch and crop is traced for the tensors autograd keeps.

What a CPSL step holds at its peak (per process):

- the student's weights, their gradients and the optimiser's state (AdamW: two moments; SGD: one momentum)
  for the trainable ones (``--freeze_backbone`` leaves the backbone's out);
- the EMA teacher and, with ``--pseudo_labels frozen``, the frozen pseudo-label model: one weight copy each;
- the activations of one student pass over the source and target crops (the step concatenates them), i.e. the
  tensors saved for the backward. With ``--gradient_checkpointing`` only each block's input is kept, plus one
  block's activations while it is recomputed in the backward.

Not counted: the teacher's forward (no graph; transient), the memory bank (bank_size x D floats), the CUDA context
and allocator fragmentation (add 1-2 GB on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GIB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes of each part of a training step's peak (see the module docstring)."""

    parameters: int
    trainable_parameters: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    copy_bytes: int
    activation_bytes: int
    attention_map_bytes: int
    """The ViT attention maps among ``activation_bytes``: saved by the meta / CPU / eager attention, not by the
    fused attention (SDPA flash / memory-efficient) a GPU runs."""

    @property
    def total_bytes(self) -> int:
        """Everything, attention maps included (eager attention)."""
        return (
            self.weight_bytes
            + self.gradient_bytes
            + self.optimizer_bytes
            + self.copy_bytes
            + self.activation_bytes
        )

    @property
    def fused_attention_total_bytes(self) -> int:
        """The total with a fused attention kernel (no attention map kept): what a GPU run needs."""
        return self.total_bytes - self.attention_map_bytes


def saved_activation_bytes(
    model: nn.Module, pixel_values: torch.Tensor, attention_heads: int | None = None
) -> tuple[int, int]:
    """Bytes of the tensors autograd saves for the backward in one forward of ``model`` (its current mode), each
    storage counted once and the parameters left out; with activation checkpointing, the inputs the checkpointed
    blocks keep instead (and, during the backward, one block's own activations: see :func:`estimate_memory`).
    Works on the meta device (no data) as on the CPU.

    Args:
        model: a ``CPSLForSemanticSegmentation``. pixel_values: N x 3 x H x W on the model's device.
        attention_heads: a ViT's number of heads: the saved N x heads x T x T attention maps are also summed apart.
    Returns:
        (bytes of all saved tensors, bytes of the attention maps among them). The meta device and the CPU run the
        attention as a matrix product and a softmax whose output is saved; the fused attention of GPUs
        (``scaled_dot_product_attention``'s flash / memory-efficient kernels) saves no map.
    """
    parameters = {parameter.untyped_storage()._cdata for parameter in model.parameters()}
    saved: dict[int, int] = {}
    maps: set[int] = set()

    def keep(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage.nbytes()
            square = tensor.ndim == 4 and tensor.shape[-1] == tensor.shape[-2] > 1
            if attention_heads is not None and square and tensor.shape[1] == attention_heads:
                maps.add(storage._cdata)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        keep(tensor)
        return tensor

    def keep_inputs(module: nn.Module, inputs: tuple) -> None:  # returns None: the inputs stay as they are
        for tensor in inputs:
            if torch.is_tensor(tensor):
                keep(tensor)

    hooks = [
        module.register_forward_pre_hook(keep_inputs)
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", False)
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(saved.values()), sum(saved[key] for key in maps)


def estimate_memory(
    config,
    crop_size: tuple[int, int],
    batch_size: int,
    optimizer: str = "adamw",
    weight_copies: int = 2,
    activation_dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    freeze_backbone: bool = False,
) -> MemoryEstimate:
    """The memory of a training step of ``config`` (a ``CPSLConfig``) on the meta device.

    Args:
        crop_size: (H, W) of the crops. batch_size: images of one student pass (source + target per process).
        optimizer: ``adamw`` (two states per trainable weight) or ``sgd`` (one).
        weight_copies: full-model copies besides the student: the EMA teacher (1), and the frozen pseudo-label
            model of ``--pseudo_labels frozen`` (2, the recipes' default).
        activation_dtype: float32, or bfloat16 / float16 for a mixed-precision run (the model is traced in that
            dtype: a lower bound, autocast keeps norms and softmax in float32).
        gradient_checkpointing: trace with the backbone's blocks checkpointed.
        freeze_backbone: leave the backbone out of the gradients and the optimiser state.
    """
    from cpsl_hf.modeling_cpsl import CPSLForSemanticSegmentation

    with torch.device("meta"):
        model = CPSLForSemanticSegmentation(config).train()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    frozen = sum(parameter.numel() for parameter in model.backbone.parameters()) if freeze_backbone else 0
    trainable = parameters - frozen
    if freeze_backbone:
        model.backbone.requires_grad_(False)

    heads = config.backbone_config.num_attention_heads if config.is_plain_vit else None

    def activations(checkpointed: bool) -> tuple[int, int]:
        if checkpointed:
            model.backbone.activation_checkpointing_enable()
        else:
            model.backbone.activation_checkpointing_disable()
        traced = model.to(activation_dtype)
        pixels = torch.empty(batch_size, 3, *crop_size, device="meta", dtype=activation_dtype)
        return saved_activation_bytes(traced, pixels, heads)

    if gradient_checkpointing:
        if not model.backbone.supports_gradient_checkpointing:
            raise ValueError(f"{type(model.backbone).__name__} does not support activation checkpointing")
        (full, full_maps), (kept, kept_maps) = activations(False), activations(True)
        blocks = sum(
            1 for module in model.backbone.modules() if getattr(module, "gradient_checkpointing", False)
        )
        blocks = max(blocks, 1)  # + one block's activations, recomputed in the backward
        activation_bytes = kept + (full - kept) // blocks
        attention_map_bytes = kept_maps + (full_maps - kept_maps) // blocks
    else:
        activation_bytes, attention_map_bytes = activations(False)
    states = {"adamw": 2, "sgd": 1}[optimizer]
    return MemoryEstimate(
        parameters=parameters,
        trainable_parameters=trainable,
        weight_bytes=4 * parameters,
        gradient_bytes=4 * trainable,
        optimizer_bytes=4 * states * trainable,
        copy_bytes=4 * parameters * weight_copies,
        activation_bytes=activation_bytes,
        attention_map_bytes=attention_map_bytes,
    )


__all__ = ["GIB", "MemoryEstimate", "estimate_memory", "saved_activation_bytes"]
