"""What a CUDA run sets up, checked on the CPU: ``--allow_tf32`` reaches the TF32 flags (they can be set without
CUDA) and is put back after the run; the training loaders pin memory on CUDA (only the plumbing to
``DataLoader(pin_memory=...)`` is tested: pinning itself needs an accelerator)."""

from __future__ import annotations

import pytest
import torch
from training_helpers import adaptation, prepared, tiny_argv

from cpsl_hf.data import loading
from cpsl_hf.data.loading import build_train_loader
from cpsl_hf.data.synthetic import load_synthetic
from cpsl_hf.training.arguments import parse_args
from cpsl_hf.training.loop import Trainer, set_tf32, tf32_settings


@pytest.fixture
def tf32_flags():
    """Leave the process's TF32 flags as they were."""
    before = tf32_settings()
    yield
    set_tf32(*before)


def test_allow_tf32_defaults_to_true_and_parses(tmp_path):
    assert parse_args(tiny_argv(tmp_path, tmp_path)).training.allow_tf32 is True
    assert parse_args(tiny_argv(tmp_path, tmp_path, "--allow_tf32", "false")).training.allow_tf32 is False
    assert parse_args(tiny_argv(tmp_path, tmp_path, "--no_allow_tf32")).training.allow_tf32 is False


def test_set_tf32_sets_both_flags(tf32_flags):
    set_tf32(True)
    assert tf32_settings() == (True, True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    set_tf32(False)
    assert tf32_settings() == (False, False)
    set_tf32(True, False)
    assert tf32_settings() == (True, False)


@pytest.mark.parametrize("allow", [True, False])
def test_allow_tf32_reaches_the_flags_on_cuda_only(tmp_path, tf32_flags, allow):
    trainer = Trainer(parse_args(tiny_argv(tmp_path, tmp_path, "--allow_tf32", str(allow).lower())))
    set_tf32(not allow)
    trainer.device = torch.device("cpu")
    trainer._configure_matmul_precision()
    assert tf32_settings() == (not allow, not allow)  # a CPU run leaves them alone
    trainer.device = torch.device("cuda")  # a device object needs no CUDA
    trainer._configure_matmul_precision()
    assert tf32_settings() == (allow, allow)


def test_a_run_puts_the_tf32_flags_back(tmp_path, tf32_flags, monkeypatch):
    """``train()`` sets ``--allow_tf32`` in ``setup`` (here as if on CUDA) and restores the flags at the end."""
    seen = []
    setup = Trainer.setup

    def cuda_like(self):
        set_tf32(self.args.training.allow_tf32)

    def recording_setup(self):
        setup(self)
        seen.append(tf32_settings())

    monkeypatch.setattr(Trainer, "_configure_matmul_precision", cuda_like)
    monkeypatch.setattr(Trainer, "setup", recording_setup)
    set_tf32(False, True)
    argv = tiny_argv(tmp_path / "run", tmp_path / "cache", "--warmup_steps", "1", "--cpsl_steps", "0")
    Trainer(parse_args([*argv, "--save_predictions", "0", "--no_eval_teacher"])).train()
    assert seen == [(True, True)]
    assert tf32_settings() == (False, True)


def test_train_loader_passes_pin_memory_to_the_dataloader(tmp_path):
    dataset = load_synthetic("source", "train", 4, (32, 64), cache_dir=tmp_path)
    assert build_train_loader(dataset, 2)._dataloader.pin_memory is False
    assert build_train_loader(dataset, 2, pin_memory=True)._dataloader.pin_memory is True


def test_trainer_pins_the_train_loaders_on_cuda_only(tmp_path, monkeypatch):
    pinned = []
    original = loading.build_train_loader  # _build_data imports it from the module when it runs

    def recording(*args, **kwargs):
        pinned.append(kwargs.get("pin_memory"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loading, "build_train_loader", recording)
    trainer = Trainer(parse_args(tiny_argv(tmp_path / "run", tmp_path / "cache")))
    trainer.setup()
    assert pinned == [False, False]
    assert trainer.source_loader._dataloader.pin_memory is False
    trainer.device = torch.device("cuda")  # what setup sees on a GPU; a device object needs no CUDA
    trainer._build_data()
    assert pinned == [False, False, True, True]
    assert trainer.source_loader._dataloader.pin_memory is True
    assert trainer.target_loader._dataloader.pin_memory is True


@pytest.mark.parametrize("compile_", [False, True])
def test_torch_compile_wraps_the_training_forwards_only(tmp_path, compile_):
    """--torch_compile: the student's forward (the prepared model), the EMA teacher's encode and the frozen P_ST
    model are compiled callables over the very modules the run trains, checkpoints and evaluates (their state
    dicts keep their keys); without it they are those modules themselves. (Compiling runs at the first call;
    bench/train_step.py --dry_run --compile runs compiled steps.)"""
    from torch._dynamo.eval_frame import OptimizedModule

    from cpsl_hf import CPSLForSemanticSegmentation

    trainer = prepared(tmp_path, tmp_path, "--torch_compile", str(compile_).lower())
    stage = adaptation(trainer)
    student = trainer.student
    assert type(student) is CPSLForSemanticSegmentation  # what the EMA, checkpoints and export see
    assert not any(key.startswith("_orig_mod") for key in student.state_dict())
    assert isinstance(trainer.model, OptimizedModule) is compile_
    if compile_:
        assert trainer.model._orig_mod is student
        assert stage.teacher_encode is not stage.teacher.module.encode
        assert stage.teacher_encode._torchdynamo_orig_callable == stage.teacher.module.encode
        assert isinstance(stage.pseudo_label_forward, OptimizedModule)
        assert stage.pseudo_label_forward._orig_mod is stage.pseudo_label_model
    else:
        assert trainer.model is student
        assert stage.teacher_encode == stage.teacher.module.encode
        assert stage.pseudo_label_forward is stage.pseudo_label_model
