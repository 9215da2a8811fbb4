"""The stage protocol: what the generic loop (:mod:`cpsl_hf.training.loop`) asks of every stage of a run.

A run is a list of stages, each a number of optimisation steps over the endless source and target streams.
The loop owns the student, its optimisers and schedules, the data streams, logging, evaluation and
checkpoints; a stage owns what only it needs (the EMA teacher, the self-labeling core, a discriminator, a
frozen labelling model) and says:

- which streams a step reads (:attr:`Stage.needs_source`, :attr:`Stage.needs_target`);
- :meth:`Stage.setup`: build its modules, once, before training or a restore (the run's random stream order);
- :meth:`Stage.start`: initialise from the previous stage, once, when the loop first enters it;
- :meth:`Stage.losses`: one step's losses (``loss`` with its graph; the rest are logged);
- :meth:`Stage.after_micro_step` / :meth:`Stage.after_step`: its own updates after the student's (a
  discriminator's step, the EMA teacher, its own schedules), masked on the device by ``run.step_finite`` (0-dim
  bool: the step's loss and gradients were finite; a non-finite step must change no state);
- :meth:`Stage.finish`: release what only its steps needed, once the next stage has started (and taken what
  it needs from this one);
- which networks are evaluated and which one it exports; its words in the model card and summary table;
- :meth:`Stage.state_dict` / :meth:`Stage.load_state_dict`: everything a resume needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # the loop imports the stages, not the other way round
    from cpsl_hf.training.diagnostics import PseudoLabelRecord
    from cpsl_hf.training.loop import Trainer


@dataclass
class StepOutput:
    """What one step of a stage returns.

    Attributes:
        losses: ``loss`` (0-dim, with its graph: the loop back-propagates it) and detached 0-dim values that
            are summed on the device and logged as window means.
        pseudo_labels: the step's target labels, for the pseudo-label monitor (self-training stages only).
    """

    losses: dict[str, torch.Tensor]
    pseudo_labels: PseudoLabelRecord | None = None


class Stage:
    """One stage of a run: ``steps`` optimisation steps at ``lr_scale`` times the base learning rates.

    Subclasses override what they need; the defaults describe a stage that trains the student alone.
    """

    needs_source: bool = True
    needs_target: bool = False

    def __init__(self, name: str, steps: int, lr_scale: float = 1.0):
        if steps < 0:
            raise ValueError(f"stage {name}: steps must be >= 0, got {steps}")
        self.name = name
        self.steps = steps
        self.lr_scale = lr_scale
        self.started = False
        self.finished = False
        self.run: Trainer | None = None

    # ------------------------------------------------------------------ life cycle
    def setup(self, run: Trainer) -> None:
        """Keep the run (student, accelerator, views, ...); subclasses also build their modules here."""
        self.run = run

    def start(self, previous: Stage | None) -> None:
        """Initialise from ``previous``, the last stage that ran (None at the start of the run)."""

    def losses(self, source_batch: dict[str, Any] | None, target_batch: dict[str, Any] | None) -> StepOutput:
        """One step's losses; batches are None for the streams this stage does not read. The target's ground
        truth has left ``target_batch`` before this is called."""
        raise NotImplementedError

    def accumulated_modules(self) -> list[nn.Module]:
        """Prepared modules besides the student that train under ``accelerator.accumulate``."""
        return []

    def after_micro_step(self, output: StepOutput) -> None:
        """After the student's optimiser step (a no-op while accumulating), every micro-batch."""

    def after_step(self) -> None:
        """After every optimisation step (the student's schedules stepped, its buffers synchronised)."""

    def finish(self) -> None:
        """Once the next stage has started: release what only this stage's steps needed."""

    # ------------------------------------------------------------------ evaluation and export
    def evaluation_networks(self) -> dict[str, nn.Module]:
        """Networks evaluated at this stage's evaluations, by name (``student``, ``teacher``)."""
        return {"student": self.run.student}

    def exported(self) -> tuple[str, nn.Module]:
        """``(name, network)`` the run exports when this is the last stage that ran."""
        return "student", self.run.student

    def column_title(self, network_name: str) -> str:
        """Column heading of this stage's network in the summary table."""
        return self.name

    def recipe(self) -> str:
        """This stage in the model card's recipe, e.g. ``300 CPSL``."""
        return f"{self.steps} {self.name}"

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs beyond the student and its optimisers (saved by the loop)."""
        return {"started": self.started, "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started = bool(state["started"])
        self.finished = bool(state["finished"])
