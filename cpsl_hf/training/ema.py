"""The EMA ("momentum") teacher f'_SEG and f'_SL of SPEC.md.

The teacher is a full copy of the student (so the EMA prototypes W' are
``teacher.self_labeling_head.prototypes``). Each update is one in-place ``torch._foreach_lerp_`` over all
floating-point parameters (``teacher += (1 - m) * (student - teacher)``) and one ``_foreach_copy_`` of the
buffers (BatchNorm statistics): no tensor is allocated per step, nothing leaves the device. The teacher
never requires gradients and stays in eval mode, except inside :meth:`EMATeacher.mode` ``(True)``.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    """Exponential moving average of a student network, updated in place.

    Args:
        student: the network to follow (unwrapped, i.e. not a DDP wrapper).
        momentum: m in ``teacher = m * teacher + (1 - m) * student``.
        ramp: use ``min(1 - 1 / (t + 1), m)`` at update t (t counted by :meth:`update` calls since the last
            :meth:`reset`), so early updates follow the student closely.
    """

    def __init__(self, student: nn.Module, momentum: float = 0.999, ramp: bool = False):
        super().__init__()
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        self.momentum = momentum
        self.ramp = ramp
        self.num_updates = 0  # a host counter: the ramp weight is a Python float, never a device sync
        self._paired_with: int | None = None

    def forward(self, *args, **kwargs):
        """Run the teacher network (callers wrap it in ``torch.no_grad()``)."""
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher always stays in eval mode (no dropout, frozen BatchNorm statistics)."""
        super().train(False)
        return self

    @contextlib.contextmanager
    def mode(self, training: bool):
        """Run the teacher in train mode inside the block when ``training`` (the reference code's EMA teacher:
        dropout and drop path on, BatchNorm normalising with the batch's own statistics); eval mode again after.
        BatchNorm running statistics the teacher updates meanwhile are overwritten by the next :meth:`update`,
        which copies the student's buffers."""
        if not training:
            yield self
            return
        self.module.train()
        try:
            yield self
        finally:
            self.module.eval()

    def _tensor_lists(self, student: nn.Module):
        """Teacher/student floating-point parameters and buffers, paired by name.

        The names are checked once per student object; the tensor lists are re-read on every call (a cheap
        walk over the modules, no tensor allocated) because moving or wrapping a module can replace its
        parameter or buffer tensors, and a cached list would then update stale copies.
        """
        if self._paired_with != id(student):
            student_names = [name for name, _ in student.named_parameters()]
            teacher_names = [name for name, _ in self.module.named_parameters()]
            if student_names != teacher_names:
                raise ValueError("EMATeacher.update: student and teacher parameters differ in names")
            if [n for n, _ in student.named_buffers()] != [n for n, _ in self.module.named_buffers()]:
                raise ValueError("EMATeacher.update: student and teacher buffers differ in names")
            self._paired_with = id(student)
        teacher_params = [p for p in self.module.parameters() if p.is_floating_point()]
        student_params = [p for p in student.parameters() if p.is_floating_point()]
        return teacher_params, student_params, list(self.module.buffers()), list(student.buffers())

    def current_momentum(self) -> float:
        """The momentum the next :meth:`update` uses: m, or ``min(1 - 1/(t+1), m)`` with the ramp."""
        if not self.ramp:
            return self.momentum
        return min(1.0 - 1.0 / (self.num_updates + 1.0), self.momentum)

    def get_extra_state(self) -> dict:
        """Checkpointed with ``state_dict()``: the update counter of the ramp."""
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def update(self, student: nn.Module, enabled: torch.Tensor | None = None) -> None:
        """``teacher <- m * teacher + (1 - m) * student`` for parameters; buffers copied from the student.

        Args:
            student: the network being trained, with the same parameter names as the teacher (pass
                ``accelerator.unwrap_model(model)``).
            enabled: optional 0-dim bool tensor (the step was finite): when false the parameters stay as they
                are (the lerp weight is ``(1 - m) * enabled``, on the device, no sync). The ramp's host counter
                still counts the update.
        """
        teacher_params, student_params, teacher_buffers, student_buffers = self._tensor_lists(student)
        weight = 1.0 - self.current_momentum()
        if enabled is not None:
            weight = enabled.to(device=teacher_params[0].device, dtype=torch.float32) * weight
        if torch.is_tensor(weight):
            # The Scalar overload would read a tensor weight on the host (``.item()``, a sync per step); the
            # List overload takes the 0-dim tensor as each parameter's weight (broadcast), on the device.
            torch._foreach_lerp_(teacher_params, student_params, [weight] * len(teacher_params))
        else:
            torch._foreach_lerp_(teacher_params, student_params, weight)
        if teacher_buffers:
            torch._foreach_copy_(teacher_buffers, student_buffers)
        self.num_updates += 1

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        """Copy the student into the teacher (start of the CPSL stage) and restart the ramp."""
        self.module.load_state_dict(student.state_dict())
        self.num_updates = 0
