"""The training loop: Accelerate setup, the accumulate / backward / step cycle, logging, evaluation and
checkpoints, for whatever stages the run is made of (:mod:`cpsl_hf.training.stages`).

It reads like ``transformers``' ``run_semantic_segmentation_no_trainer.py``: build the ``Accelerator``, the
datasets, the model and the optimisers, ``prepare`` them, then loop over global steps. At every step the stage
that owns it gives the losses; the loop back-propagates, steps the student's optimisers and schedule, and asks
the stage for its own updates. A stage starts (initialising from the previous one) when the loop first enters
it and is evaluated when it ends; :mod:`cpsl_hf.training.export` writes the result.

Nothing in the per-step path moves a value to the host: losses and diagnostics are summed on the device and
read every ``--logging_steps``.

Faults (:mod:`cpsl_hf.training.faults`): a step whose loss or gradients are not finite is detected on the device
and changes nothing (the fused optimisers skip it through ``found_inf``, as under ``GradScaler``; the student's
buffers are put back; the stages mask their own updates with :attr:`Trainer.step_finite`); the logging window
reports it and ``--max_nonfinite_steps`` consecutive ones stop the run. A stop signal or ``--max_train_time``
is read at the logging window's reduction too, so all processes stop after the same step, save, and exit.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpsl_hf.utils import autocast_dtype, json_ready, progress

from . import export
from .arguments import RunArguments, parse_duration, resolve_classes, validate_against_datasets
from .building import build_model, load_domain_dataset, make_optimizer, parameter_groups, peek_dataset
from .checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from .cpu_threads import configure_cpu_threads, parse_cpu_threads
from .diagnostics import PseudoLabelMonitor
from .faults import NonFiniteTraining, Preempted, StopRequest
from .schedule import schedule_lr_factor
from .stages import Stage, StepOutput, build_stages
from .views import Views

logger = logging.getLogger(__name__)


class Trainer:
    """Runs one adaptation: ``Trainer(args).train()``.

    Args:
        args: the parsed :class:`RunArguments` (``parse_args`` validates them).
        stages: the run's stages in order; by default :func:`~cpsl_hf.training.stages.build_stages` of ``args``.

    What stages use (after :meth:`setup`): ``accelerator``, ``device``, ``model`` (prepared, maybe DDP-wrapped)
    and ``student`` (the plain network), ``views``, ``num_classes``, ``embedding_dim``, :meth:`lr_factor`,
    :meth:`reset_optimizer_state`, :meth:`progress`, :meth:`target_train_pass_loader` and ``step_finite``.
    """

    def __init__(self, args: RunArguments, stages: list[Stage] | None = None):
        self.args = args
        self.stages = build_stages(args) if stages is None else list(stages)
        self.history: dict[str, dict[str, dict[str, Any]]] = {}  # stage -> step -> network -> metrics
        self.pseudo_label_history: dict[str, dict[str, Any]] = {}  # stage -> stage_summary of the monitor
        self.log_history: list[dict[str, Any]] = []  # {"step", "stage", **logged scalars} per logging window
        self.pseudo_label_monitor: PseudoLabelMonitor | None = None
        self.prototype_optimizer = self.prototype_scheduler = None  # W's own (--prototype_optimizer)
        self.folder_lock = None  # held by the main process while the run trains
        self.step = 0
        self.output_dir = Path(args.training.output_dir)
        self.started = time.time()
        self.stage_ends = list(itertools.accumulate(stage.steps for stage in self.stages))
        self.total_steps = self.stage_ends[-1] if self.stages else 0
        self.step_finite: torch.Tensor | None = None  # 0-dim bool, on the device: the last step was finite
        self.stop_request = StopRequest()
        self._saved_at: int | None = None  # the step of the last checkpoint this invocation wrote

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Accelerator, datasets, loaders, model, optimisers and schedule (``prepare``d), then each stage's own."""
        from accelerate.utils import set_seed

        training = self.args.training
        if training.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.accelerator = accelerator = _make_accelerator(training, self.output_dir)
        self._claim_output_dir()
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        if not accelerator.is_main_process:
            logging.getLogger("cpsl_hf").setLevel(logging.WARNING)
        self.cpu_threads, threads_reason = configure_cpu_threads(
            parse_cpu_threads(training.cpu_threads), on_cpu=accelerator.device.type == "cpu"
        )
        set_seed(training.seed)  # same on every process: identical initial weights
        self.device = accelerator.device
        self._configure_matmul_precision()
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._build_data()
        self._build_model_and_optimizers()
        if threads_reason is not None and accelerator.is_main_process:
            logger.info("training on %d CPU threads (%s)", self.cpu_threads, threads_reason)
        self.step_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._bad_steps = torch.zeros((), device=self.device)  # in the current logging window
        self._consecutive_bad = torch.zeros((), device=self.device)
        self._most_consecutive_bad = torch.zeros((), device=self.device)  # in the current logging window
        self._buffer_snapshot: list[torch.Tensor] = []
        if self.args.cpsl.pseudo_label_diagnostics:
            self.pseudo_label_monitor = PseudoLabelMonitor(self.num_classes, self.device)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(training.seed * 1000 + 17 + accelerator.process_index)
        data = self.args.data
        self.views = Views(data.crop_size, data.scale_range, data.source_augment, generator)
        for stage in self.stages:
            stage.setup(self)
        if training.report_to != "none":
            accelerator.init_trackers("cpsl", config=tracker_config(self.args))

    def _configure_matmul_precision(self) -> None:
        """On CUDA, TF32 float32 matmuls and cuDNN convolutions as ``--allow_tf32`` says (:meth:`train` puts the
        process's previous settings back)."""
        if self.device.type == "cuda":
            set_tf32(self.args.training.allow_tf32)

    def _claim_output_dir(self) -> None:
        """The main process checks the output folder and locks it (:mod:`cpsl_hf.training.run_folder`); every
        process raises the same error, so none waits for ever on the others."""
        from accelerate.utils import broadcast_object_list

        from .run_folder import OutputFolderError, RunFolderLock, check_new_run

        training = self.args.training
        problem = [None]
        if self.accelerator.is_main_process:
            try:
                check_new_run(self.output_dir, self._resumes(), training.overwrite_output_dir)
                self.folder_lock = RunFolderLock(self.output_dir)
                self.folder_lock.acquire()
            except OutputFolderError as error:
                problem = [str(error)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(problem)
        if problem[0] is not None:
            raise OutputFolderError(problem[0])

    def _resumes(self) -> bool:
        """Whether this run continues one: a named checkpoint, or ``latest`` / ``auto`` with a checkpoint to take
        (without one they start a new run, which must not overwrite a finished one)."""
        from .checkpointing import list_checkpoints

        resume = self.args.training.resume_from_checkpoint
        if resume in ("latest", "auto"):
            return bool(list_checkpoints(self.output_dir))
        return resume is not None

    def _build_model_and_optimizers(self) -> None:
        """The student, its optimiser (and W's own when ``--prototype_optimizer`` differs) and the schedule.

        W is trained by ``L_SL`` outside the student's forward (on teacher embeddings), which DDP's reducer
        cannot track; it is left out of DDP and its gradient all-reduced by hand (:meth:`_sync_prototype_gradient`).
        """
        args, accelerator = self.args, self.accelerator
        model = build_model(args)
        self.num_classes = args.data.num_classes
        self.class_table = resolve_classes(args.data).table
        self.class_names = list(self.class_table.names)
        self.embedding_dim = model.config.embedding_dim
        network_groups, prototype_group = parameter_groups(model, args)
        separate_prototypes = args.cpsl.prototype_optimizer != args.training.optimizer
        if not separate_prototypes:
            network_groups.append(prototype_group)
        optimizer = make_optimizer(args.training.optimizer, network_groups, args.training)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        if accelerator.num_processes > 1:
            from torch.nn.parallel import DistributedDataParallel

            prototypes = model.self_labeling_head.prototypes
            names = [name for name, parameter in model.named_parameters() if parameter is prototypes]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.model = self.compiled(self.model)  # the prepared (maybe DDP) model, checkpointed as before
        if separate_prototypes:
            prototype_optimizer = make_optimizer(
                args.cpsl.prototype_optimizer, [prototype_group], args.training
            )
            prototype_scheduler = torch.optim.lr_scheduler.LambdaLR(prototype_optimizer, self.lr_factor)
            self.prototype_optimizer, self.prototype_scheduler = accelerator.prepare(
                prototype_optimizer, prototype_scheduler
            )

    def _build_data(self) -> None:
        from cpsl_hf.data.loading import build_train_loader

        args, accelerator = self.args, self.accelerator
        data, training = args.data, args.training
        with accelerator.main_process_first():
            self.source_train = load_domain_dataset(args, "source", "train")
            self.target_train = load_domain_dataset(args, "target", data.target_train_split)
            self.target_val = load_domain_dataset(args, "target", data.target_val_split)
        if data.max_eval_images is not None and hasattr(self.target_val, "select"):
            self.target_val = self.target_val.select(range(min(data.max_eval_images, len(self.target_val))))
        source_size, source_max = peek_dataset(self.source_train)
        target_size, target_max = peek_dataset(self.target_train)
        _, val_max = peek_dataset(self.target_val)
        validate_against_datasets(
            args,
            tuple(data.source_resize) if data.source_resize else source_size,
            tuple(data.target_resize) if data.target_resize else target_size,
            source_max,
            val_max if val_max is not None else target_max,
        )
        shard = dict(
            num_workers=data.num_workers,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            # On CUDA, page-locked batches: next_batch's non_blocking copies are then asynchronous.
            pin_memory=self.device.type == "cuda",
        )
        self.source_loader = build_train_loader(
            self.source_train, training.source_batch_size, image_size=_size(data.source_resize),
            seed=training.seed, **shard,
        )  # fmt: skip
        self.target_loader = build_train_loader(
            self.target_train, training.target_batch_size, image_size=_size(data.target_resize),
            seed=training.seed + 1, **shard,
        )  # fmt: skip

    # ------------------------------------------------------------------ what stages use
    @property
    def student(self) -> nn.Module:
        """The student network without its DDP and torch.compile wrappers."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def compiled(self, function):
        """``torch.compile(function)`` with ``--torch_compile`` (a module or a bound method; the original keeps
        its parameters and state dict), else ``function`` itself."""
        if not self.args.training.torch_compile:
            return function
        return torch.compile(function)

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at ``step``: every stage restarts a warm-up + poly schedule at its scale."""
        training = self.args.training
        return schedule_lr_factor(
            step,
            [stage.steps for stage in self.stages],
            [stage.lr_scale for stage in self.stages],
            training.lr_warmup_steps,
            training.poly_power,
        )

    def optimizers(self) -> list:
        """The prepared optimisers of the student: the network's, and W's own when it has one."""
        return [self.optimizer] + ([self.prototype_optimizer] if self.prototype_optimizer is not None else [])

    def reset_optimizer_state(self) -> None:
        """Empty the student's optimiser state (a new stage trains as a separate run would)."""
        for optimizer in self.optimizers():
            optimizer.optimizer.state.clear()
        self._prepare_step_skipping()

    def _prepare_step_skipping(self) -> None:
        """Make every optimiser of the student able to skip a step on the device: the fused implementations
        (whatever a restored state says) read ``found_inf`` as under ``GradScaler``; SGD's momentum buffers
        exist from the start (a fused SGD whose first step is skipped would otherwise keep an uninitialised
        buffer; a zero buffer gives the same first update)."""
        for optimizer in self.optimizers():
            inner = optimizer.optimizer
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
                for parameter in group["params"]:
                    state = inner.state.get(parameter)
                    step = None if state is None else state.get("step")
                    if torch.is_tensor(step) and step.device != parameter.device:  # a foreach-written state
                        state["step"] = step.to(device=parameter.device, dtype=torch.float32)
                    if isinstance(inner, torch.optim.SGD) and group.get("momentum", 0) != 0:
                        state = inner.state[parameter]
                        if state.get("momentum_buffer") is None:
                            state["momentum_buffer"] = torch.zeros_like(parameter)

    def progress(self, iterable, description: str):
        """``iterable`` with a progress bar on the main process when ``--progress_bar``."""
        enabled = self.accelerator.is_main_process and self.args.training.progress_bar
        return progress(iterable, enabled, description, leave=False)

    def _one_pass_loader(self, dataset, resize):
        from cpsl_hf.data.loading import build_eval_loader

        return build_eval_loader(
            dataset,
            image_size=_size(resize),
            batch_size=self.args.training.eval_batch_size,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
        )

    def eval_loader(self):
        """A fresh one-pass loader over the target validation split (this process's shard)."""
        return self._one_pass_loader(self.target_val, self.args.data.eval_resize)

    def target_train_pass_loader(self, max_images: int | None = None):
        """A one-pass loader over (the first ``max_images`` of) the target training set, this process's shard."""
        dataset = self.target_train
        if max_images is not None and hasattr(dataset, "select"):
            dataset = dataset.select(range(min(max_images, len(dataset))))
        return self._one_pass_loader(dataset, self.args.data.target_resize)

    # ------------------------------------------------------------------ stages
    def stage_at(self, step: int) -> Stage:
        """The stage that global ``step`` belongs to (the last stage for steps past the end)."""
        for stage, end in zip(self.stages, self.stage_ends, strict=True):
            if step < end:
                return stage
        return self.stages[-1]

    def last_started_stage(self) -> Stage | None:
        started = [stage for stage in self.stages if stage.started]
        return started[-1] if started else None

    def start_stage(self, stage: Stage) -> None:
        """Record the starting point if nothing was evaluated at this step (a run that skips its first stages;
        recorded as the first stage's evaluation), let the stage initialise from the last one that ran, then
        let that one release what only its own steps needed."""
        if stage is not self.stages[0] and not any(
            str(self.step) in by_step for by_step in self.history.values()
        ):
            self.evaluate(self.stages[0])
        if self.accelerator.is_main_process:
            logger.info("stage %s: %s", stage.name, stage.recipe())
        previous = self.last_started_stage()
        stage.start(previous)
        stage.started = True
        if previous is not None and not previous.finished:
            previous.finish()
            previous.finished = True
        self.model.train()

    # ------------------------------------------------------------------ one step
    def next_batch(self, loader) -> dict[str, Any]:
        """The next batch of an endless stream, on the device (pixel values, labels, names)."""
        # A DataLoader draws its base seed from the global RNG whenever it starts an epoch (or restarts after a
        # resume); forking keeps that draw out of the training stream (dropout), so resumes are bit-exact.
        with torch.random.fork_rng(devices=[]):
            batch = next(loader)
        return {
            "pixel_values": batch["pixel_values"].to(self.device, non_blocking=True),
            "labels": batch["labels"].to(self.device, non_blocking=True),
            "name": batch["name"],
        }

    def micro_step(self, stage: Stage) -> tuple[StepOutput, int]:
        """One forward / backward of ``stage`` under ``accumulate``; the optimisers step when the gradients
        sync. Returns the step's output and the number of images it read on this process."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model, *stage.accumulated_modules()):
            # Source first, then target, whatever the stage (the streams' order is part of a resume).
            source_batch = self.next_batch(self.source_loader) if stage.needs_source else None
            target_batch = self.next_batch(self.target_loader) if stage.needs_target else None
            # The target's ground truth leaves the batch before any loss sees it: only the pseudo-label
            # diagnostics read it.
            target_truth = None if target_batch is None else target_batch.pop("labels")
            if self._first_micro_step:
                self._start_optimisation_step()
            output = stage.losses(source_batch, target_batch)
            if self.pseudo_label_monitor is not None and output.pseudo_labels is not None:
                self.pseudo_label_monitor.update(stage.name, target_truth, output.pseudo_labels)
            loss = output.losses["loss"]
            self._loss_finite &= torch.isfinite(loss.detach())
            accelerator.backward(loss)
            self._first_micro_step = accelerator.sync_gradients
            if accelerator.sync_gradients:
                self._sync_prototype_gradient()
                if self.args.training.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(self.model.parameters(), self.args.training.max_grad_norm)
                self._check_finite()
            for optimizer in self.optimizers():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            stage.after_micro_step(output)
        images = sum(
            batch["pixel_values"].shape[0] for batch in (source_batch, target_batch) if batch is not None
        )
        return output, images

    def optimisation_step_done(self, stage: Stage) -> None:
        """After the gradients synced: the student's schedules, its buffers, the stage's own updates, the step."""
        self.scheduler.step()
        if self.prototype_scheduler is not None:
            self.prototype_scheduler.step()
        self._restore_buffers_unless_finite()
        self._sync_buffers()
        stage.after_step()
        self._count_step()
        self.step += 1

    # ------------------------------------------------------------------ non-finite steps, on the device
    _first_micro_step = True

    def _start_optimisation_step(self) -> None:
        """Before the first forward of an optimisation step: the student's buffers (BatchNorm statistics and
        counters, which the forward updates) are kept, and the step's loss flag starts true."""
        buffers = list(self.student.buffers())
        if [b.shape for b in self._buffer_snapshot] != [b.shape for b in buffers]:
            self._buffer_snapshot = [torch.empty_like(b) for b in buffers]
        if buffers:
            torch._foreach_copy_(self._buffer_snapshot, buffers)
        self._loss_finite = torch.ones((), dtype=torch.bool, device=self.device)

    def _check_finite(self) -> None:
        """:attr:`step_finite` = the step's losses and every gradient of the student are finite (all processes
        agree: one all-reduce of a 0-dim tensor, no host sync), and the optimisers' ``found_inf`` from it. Under
        fp16 the gradients are the ``GradScaler``'s business (an overflow is routine there): only the loss counts."""
        found = (~self._loss_finite).float()
        if self.accelerator.mixed_precision != "fp16":
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:  # exact (not a norm that could overflow); multiplies by 1, a no-op on the values
                torch._amp_foreach_non_finite_check_and_unscale_(
                    grads, found, torch.ones((), device=self.device)
                )
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        self.step_finite = found == 0
        if self.accelerator.mixed_precision != "fp16":  # under fp16 the scaler sets its own found_inf
            for optimizer in self.optimizers():
                optimizer.optimizer.found_inf = found

    def _restore_buffers_unless_finite(self) -> None:
        buffers = list(self.student.buffers())
        for buffer, kept in zip(buffers, self._buffer_snapshot, strict=True):
            buffer.copy_(torch.where(self.step_finite, buffer, kept))

    def _count_step(self) -> None:
        bad = (~self.step_finite).float()
        self._bad_steps += bad
        self._consecutive_bad.add_(1.0).mul_(bad)
        torch.maximum(self._most_consecutive_bad, self._consecutive_bad, out=self._most_consecutive_bad)

    def _sync_prototype_gradient(self) -> None:
        """All-reduce (mean) the gradient of W, which DDP does not manage (see :meth:`_build_model_and_optimizers`)."""
        if self.accelerator.num_processes == 1:
            return
        grad = self.student.self_labeling_head.prototypes.grad
        if grad is not None:
            torch.distributed.all_reduce(grad)
            grad.div_(self.accelerator.num_processes)

    def _sync_buffers(self) -> None:
        """Broadcast the student's buffers (BatchNorm statistics) from process 0, as DDP does before the next
        forward, so that the EMA teacher, evaluations and checkpoints are identical on every process."""
        if self.accelerator.num_processes == 1:
            return
        # Looked up every time: evaluation moves the model (``.to``), which may replace buffer tensors.
        handles = [torch.distributed.broadcast(b, src=0, async_op=True) for b in self.student.buffers()]
        for handle in handles:
            handle.wait()

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run (or resume) every stage; returns the metrics history (also written to metrics.json).

        Raises :class:`~cpsl_hf.training.faults.Preempted` (exit status 75) after a stop signal or
        ``--max_train_time`` (a checkpoint saved), :class:`~cpsl_hf.training.faults.NonFiniteTraining` (70)
        after ``--max_nonfinite_steps`` consecutive non-finite steps (nothing saved)."""
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        tf32_before = tf32_settings()
        try:
            with self.stop_request:  # the previous signal handlers come back when training ends
                return self._train()
        finally:  # leave the process as it was (tests and notebooks run several trainings)
            torch.use_deterministic_algorithms(deterministic_before)
            set_tf32(*tf32_before)
            if self.folder_lock is not None:
                self.folder_lock.release()

    def _train(self) -> dict[str, Any]:
        self.setup()
        training, accelerator = self.args.training, self.accelerator
        checkpoint = resolve_checkpoint(training.resume_from_checkpoint, self.output_dir)
        if checkpoint is not None:
            self.restore(checkpoint)
        self._prepare_step_skipping()
        total = self.total_steps
        stop = total if training.stop_at_step is None else min(training.stop_at_step, total)
        enabled = accelerator.is_main_process and training.progress_bar
        bar = progress(None, enabled, "train", total=total, initial=self.step)
        window = LogWindow()
        self.model.train()
        while self.step < stop:
            stage = self.stage_at(self.step)
            if not stage.started:
                self.start_stage(stage)
            if bar is not None:
                bar.set_description(stage.name)
            output, images = self.micro_step(stage)
            window.add(output.losses, images)
            if not accelerator.sync_gradients:
                continue
            self.optimisation_step_done(stage)
            window.steps += 1
            if bar is not None:
                bar.update(1)
            stop_reason = None
            if self.step % training.logging_steps == 0 or self.step == stop:
                stop_reason = self._log_window(window, stage, bar)
                window = LogWindow()
            self._after_step(stage, stop)
            if stop_reason is not None and self.step < stop:
                if bar is not None:
                    bar.close()
                self._preempt(stop_reason)
        if bar is not None:
            bar.close()
        return self._end_run(stop)

    def _preempt(self, reason: str) -> None:
        """Save (unless this step was just saved), say how to continue, raise :class:`Preempted`."""
        saved = "a checkpoint is saved"
        if bool(self._consecutive_bad > 0):
            saved = "the step was not finite, so the last checkpoint stays latest"
        elif self._saved_at != self.step:
            self.save()
        accelerator = self.accelerator
        message = (
            f"Stopped at step {self.step} of {self.total_steps} ({reason}); {saved}. Continue with "
            f"--resume_from_checkpoint auto --output_dir {self.output_dir}"
        )
        if accelerator.is_main_process:
            print(message, flush=True)
        accelerator.end_training()
        raise Preempted(message)

    def _stop_requested(self) -> float:
        """1.0 when this process got a stop signal or spent ``--max_train_time``, else 0.0 (host values)."""
        budget = self.args.training.max_train_time
        over_time = budget is not None and time.time() - self.started >= parse_duration(budget)
        return float(self.stop_request.signal_number is not None or over_time)

    def _after_step(self, stage: Stage, stop: int) -> None:
        """The evaluations and checkpoints due after the step just taken."""
        training = self.args.training
        end_of_stage = self.step in self.stage_ends
        if end_of_stage:
            self.evaluate(self.stage_at(self.step - 1))
        elif training.eval_steps and self.step % training.eval_steps == 0:
            self.evaluate(stage)
        if (training.checkpointing_steps and self.step % training.checkpointing_steps == 0) or (
            self.step == stop and stop < self.total_steps
        ):
            if bool(self._consecutive_bad > 0):  # a host sync, at checkpoint steps only
                logger.warning("step %d was not finite: no checkpoint (the last one stays latest)", self.step)
            else:
                self.save()
                self._saved_at = self.step

    def _end_run(self, stop: int) -> dict[str, Any]:
        """Export at the end of the last stage; a run stopped early (``--stop_at_step``) says how to resume."""
        accelerator = self.accelerator
        if self.step < self.total_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                print(
                    f"Stopped at step {self.step} of {self.total_steps} (--stop_at_step); resume with "
                    f"--resume_from_checkpoint auto --output_dir {self.output_dir}"
                )
            accelerator.end_training()
            return self.history
        try:
            export.export_run(self)
        finally:  # trackers are closed even when the push fails
            accelerator.end_training()
        return self.history

    def _log_window(self, window: LogWindow, stage: Stage, bar) -> str | None:
        """Average the device-side sums over the window's finite steps and the processes: the only host sync of
        the loop. The same reduction carries the non-finite counts and each process's stop request; returns why
        the run must stop now (a signal, the time budget) or None, and raises :class:`NonFiniteTraining` after
        ``--max_nonfinite_steps`` consecutive non-finite steps."""
        if not window.sums or window.steps == 0:
            return None
        names = sorted(window.sums)
        good_steps = window.steps - self._bad_steps
        means = torch.stack([window.sums[name].float() for name in names]) / good_steps.clamp_min(1.0)
        means = torch.where(
            good_steps > 0, means, torch.full_like(means, float("nan"))
        )  # no finite step: nan
        nonfinite = torch.stack([window.nonfinite[name] for name in names])
        faults = torch.stack([self._bad_steps, self._most_consecutive_bad])
        request = torch.tensor([self._stop_requested()], device=self.device)
        stacked = torch.cat([means, nonfinite, faults, request])
        reduced = self.accelerator.reduce(stacked, reduction="mean").tolist()
        count = len(names)
        values, nonfinite_counts = reduced[:count], reduced[count : 2 * count]
        bad_steps, most_consecutive, stop_requested = reduced[2 * count :]
        self._bad_steps.zero_()
        self._most_consecutive_bad.copy_(self._consecutive_bad)
        if bad_steps > 0:
            self._report_nonfinite(names, nonfinite_counts, int(round(bad_steps)), window.steps)
        if most_consecutive >= self.args.training.max_nonfinite_steps:
            self._stop_nonfinite(int(round(most_consecutive)))
        logs = dict(zip(names, values, strict=True))
        if self.pseudo_label_monitor is not None:
            logs.update(self.pseudo_label_monitor.window_summary())
        for optimizer in self.optimizers():
            for group in optimizer.optimizer.param_groups:
                logs[f"lr_{group['name']}"] = group["lr"]
        images = window.images * self.accelerator.num_processes
        logs["images_per_second"] = images / max(time.time() - window.started, 1e-9)
        self.accelerator.log(logs, step=self.step)
        self.log_history.append({"step": self.step, "stage": stage.name, **logs})
        if bar is not None:
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss")})
        elif self.accelerator.is_main_process:
            formatted = ", ".join(f"{key} {value:.4g}" for key, value in logs.items())
            logger.info("step %d/%d (%s): %s", self.step, self.total_steps, stage.name, formatted)
        if stop_requested > 0:
            signal_number = self.stop_request.signal_number
            return (
                f"signal {signal_number}"
                if signal_number is not None
                else "a stop signal or --max_train_time"
            )
        return None

    def _report_nonfinite(self, names: list[str], counts: list[float], bad_steps: int, steps: int) -> None:
        if not self.accelerator.is_main_process:
            return
        terms = ", ".join(
            f"{name} ({count:.3g} micro-steps)" for name, count in zip(names, counts) if count > 0
        )
        logger.warning(
            "step %d: %d of the last %d steps were not finite and were skipped (no update); non-finite terms "
            "(mean over processes): %s",
            self.step, bad_steps, steps, terms or "none (a gradient only)",
        )  # fmt: skip

    def _stop_nonfinite(self, consecutive: int) -> None:
        from .checkpointing import find_latest_checkpoint

        latest = find_latest_checkpoint(self.output_dir)
        message = (
            f"Stopped at step {self.step}: {consecutive} consecutive steps with a non-finite loss or gradient "
            f"(--max_nonfinite_steps {self.args.training.max_nonfinite_steps}); nothing was saved or exported. "
            + (
                f"The last good checkpoint is {latest}."
                if latest is not None
                else "There is no checkpoint of this run."
            )
            + " Lower --learning_rate or set --max_grad_norm (or try --mixed_precision no) and resume with "
            f"--resume_from_checkpoint auto --output_dir {self.output_dir}"
        )
        if self.accelerator.is_main_process:
            logger.error(message)
            print(message, flush=True)
        self.accelerator.end_training()
        raise NonFiniteTraining(message)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, stage: Stage) -> dict[str, dict[str, Any]]:
        """mIoU of the stage's networks on the target validation split, in ``history[stage][step]``."""
        from cpsl_hf.evaluation import evaluate_model

        training = self.args.training
        results = {}
        autocast = autocast_dtype(training.mixed_precision)
        for who, network in stage.evaluation_networks().items():
            with torch.random.fork_rng(devices=[]):  # evaluating never changes the training's random stream
                metrics = evaluate_model(
                    network,
                    self.eval_loader(),
                    self.num_classes,
                    device=self.device,
                    autocast_dtype=autocast,
                    class_names=self.class_names,
                    progress=self.accelerator.is_main_process and training.progress_bar,
                )
            results[who] = json_ready(metrics)
        if self.accelerator.is_main_process and training.save_predictions > 0:
            # A few image | ground truth | prediction strips per evaluation, to look at how adaptation goes.
            export.save_predictions(
                self, self.student, self.output_dir / "predictions" / f"{stage.name}-step{self.step:06d}"
            )
        self.student.train()
        self.history.setdefault(stage.name, {})[str(self.step)] = results
        monitor = self.pseudo_label_monitor
        if monitor is not None and stage.name in monitor.totals:
            summary = monitor.stage_summary(stage.name, self.class_names)
            if summary is not None:
                self.pseudo_label_history[stage.name] = {"step": self.step, **summary}
        if self.accelerator.is_main_process:
            summary = ", ".join(f"{who} mIoU {100 * m['mean_iou']:.2f}" for who, m in results.items())
            logger.info("evaluation at step %d (%s): %s", self.step, stage.name, summary)
        self.accelerator.log(
            {f"eval/{who}_miou": m["mean_iou"] for who, m in results.items()}, step=self.step
        )
        return results

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Checkpoint the run: the student and optimisers (``save_state``), every stage's state, the history,
        and each process's data positions and augmentation generator."""
        run_state = {
            "step": self.step,
            "stage": self.stage_at(self.step).name,
            "stages": {stage.name: stage.state_dict() for stage in self.stages},
            "pseudo_label_history": self.pseudo_label_history,
            "history": self.history,
            "log_history": self.log_history,
            "arguments": self.args.to_dict(),
        }
        monitor = self.pseudo_label_monitor
        process_state = {
            "source_loader": self.source_loader.state_dict(),
            "target_loader": self.target_loader.state_dict(),
            "generator": self.views.generator.get_state(),
            "pseudo_label_monitor": None if monitor is None else monitor.state_dict(),
        }
        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.step,
            run_state,
            process_state,
            self.args.training.checkpoints_total_limit,
        )

    def restore(self, path: Path) -> None:
        run_state, process_state = load_checkpoint(self.accelerator, path)
        saved = run_state.get("stages")
        if saved is None or set(saved) != {stage.name for stage in self.stages}:
            found = "none (written by an older version)" if saved is None else ", ".join(saved)
            raise ValueError(
                f"--resume_from_checkpoint {str(path)!r}: the checkpoint's stages ({found}) are not this run's "
                f"({', '.join(stage.name for stage in self.stages)})"
            )
        self.step = int(run_state["step"])
        for stage in self.stages:
            stage.load_state_dict(saved[stage.name])
        self.pseudo_label_history = run_state["pseudo_label_history"]
        self.history = run_state["history"]
        self.log_history = list(run_state.get("log_history", []))  # absent from checkpoints of older versions
        if self.pseudo_label_monitor is not None and process_state["pseudo_label_monitor"] is not None:
            self.pseudo_label_monitor.load_state_dict(process_state["pseudo_label_monitor"])
        self.source_loader.load_state_dict(process_state["source_loader"])
        self.target_loader.load_state_dict(process_state["target_loader"])
        self.views.generator.set_state(process_state["generator"])
        if self.accelerator.is_main_process:
            logger.info("resumed from %s at step %d", path, self.step)


class LogWindow:
    """Device-side sums of a logging window's finite losses, the number of micro-steps in which each was not
    finite, its optimisation steps and images."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.nonfinite: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0
        self.started = time.time()

    def add(self, losses: dict[str, torch.Tensor], images: int) -> None:
        """Add one micro-step's 0-dim values (the loop counts the window's optimisation steps in ``steps``); a
        NaN or Inf adds 0 to the sum and 1 to the term's non-finite count."""
        for name, value in losses.items():
            value = value.detach().float()
            finite = torch.isfinite(value)
            value = torch.where(finite, value, torch.zeros_like(value))
            bad = (~finite).float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.nonfinite[name] = self.nonfinite[name] + bad if name in self.nonfinite else bad
        self.images += images


def train(args: RunArguments) -> dict[str, Any]:
    """Run the UDA pipeline described by ``args`` (see :func:`cpsl_hf.training.arguments.parse_args`)."""
    return Trainer(args).train()


def _make_accelerator(training, output_dir: Path):
    """``Accelerator(cpu=True)`` without a GPU, so that processes started by ``accelerate launch --multi_gpu``
    or ``torchrun`` on CPUs form a gloo group instead of training alone."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=training.mixed_precision,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        log_with=None if training.report_to == "none" else training.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / TRACKER_DIRNAME)
        ),
        step_scheduler_with_optimizer=False,
    )


def tf32_settings() -> tuple[bool, bool]:
    """``(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)``."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def set_tf32(matmul: bool, cudnn: bool | None = None) -> None:
    """Allow (or not) TF32 in CUDA float32 matmuls and, with the same value unless ``cudnn`` is given, in cuDNN
    convolutions. The flags can be set without CUDA (they then do nothing)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(matmul)
    torch.backends.cudnn.allow_tf32 = bool(matmul if cudnn is None else cudnn)


def _size(values) -> tuple[int, int] | None:
    return tuple(values) if values else None


TRACKER_DIRNAME = "runs"
"""Where ``--report_to tensorboard`` writes its event files in the output folder: pushed with the model, where the
Hub's training-metrics tab finds them."""


def tracker_config(args: RunArguments) -> dict[str, Any]:
    """The run's arguments for the trackers, flat (``group/name``: scalars and strings only), with local paths
    replaced by ``<local>/NAME`` (the event files and ``hparams.yml`` travel to the Hub with the model)."""
    from cpsl_hf.provenance import local_paths, redact_local_paths

    arguments = args.to_dict()
    hidden = local_paths(arguments, args.training.output_dir)
    flat = {}
    for group, values in arguments.items():
        for key, value in values.items():
            value = value if isinstance(value, (int, float, str, bool)) else str(value)
            flat[f"{group}/{key}"] = redact_local_paths(value, hidden) if isinstance(value, str) else value
    return flat


__all__ = ["TRACKER_DIRNAME", "LogWindow", "Trainer", "set_tf32", "tf32_settings", "train", "tracker_config"]
