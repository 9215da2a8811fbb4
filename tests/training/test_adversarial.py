"""The output-space adversarial warm-up (``--warmup_adversarial``, AdaptSegNet): a whole run, the losses
against an independent computation, where the gradients go, resume inside the warm-up, 2 processes, bad
configuration."""

import json
import logging
import textwrap

import pytest
import torch
import torch.nn.functional as F
from training_helpers import adaptation, run, run_two_processes, stage_named
from training_helpers import tiny_argv as shared_tiny_argv

from cpsl_hf.training.adversarial import (
    OutputDiscriminator,
    discriminator_loss,
    domain_loss,
    generator_loss,
)
from cpsl_hf.training.arguments import ConfigurationError, parse_args
from cpsl_hf.training.checkpointing import find_latest_checkpoint
from cpsl_hf.training.loop import Trainer


def tiny_argv(output_dir, cache, *extra):
    """The shared tiny run (2 warm-up + 2 CPSL steps, 32 x 32 crops), adversarial warm-up, no strips."""
    return shared_tiny_argv(output_dir, cache, "--save_predictions", "0", "--warmup_adversarial", *extra)


def _copy(state):
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def _discriminator_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return trainer.accelerator.unwrap_model(stage_named(trainer, "warmup").discriminator).state_dict()


class RecordingTrainer(Trainer):
    """Keeps D's weights as ``setup`` built them."""

    def setup(self) -> None:
        super().setup()
        self.initial_discriminator = _copy(_discriminator_state(self))


# ------------------------------------------------------------------------------------------------ a whole run
def test_adversarial_warmup_then_cpsl_exports_a_loadable_model(tmp_path, synthetic_cache, caplog):
    from transformers import AutoModel

    caplog.set_level(logging.INFO, logger="cpsl_hf.training.loop")
    out = tmp_path / "run"
    trainer = run(tiny_argv(out, synthetic_cache, "--lambda_adv", "0.5"), RecordingTrainer)
    assert trainer.step == 4 and adaptation(trainer).started

    discriminator = trainer.accelerator.unwrap_model(stage_named(trainer, "warmup").discriminator)
    assert isinstance(discriminator, OutputDiscriminator)
    final = _discriminator_state(trainer)
    changed = [name for name in final if not torch.equal(final[name], trainer.initial_discriminator[name])]
    assert sorted(changed) == sorted(final)  # every weight and bias of D was trained
    assert all(p.requires_grad for p in discriminator.parameters())  # frozen only inside the generator term
    assert stage_named(trainer, "warmup").optimizer.optimizer.state  # Adam moments exist

    # Losses are logged through the running sums: adversarial terms in the warm-up, not in the CPSL stage.
    step_logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(step_logs) == 4
    for line in step_logs[:2]:
        assert "(warmup)" in line and "loss_adv" in line and "loss_discriminator" in line
    for line in step_logs[2:]:
        assert "(cpsl)" in line and "loss_adv" not in line and "loss_discriminator" not in line

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["history"]) == ["warmup", "cpsl"]
    assert metrics["training"]["arguments"]["adversarial"]["warmup_adversarial"] is True
    assert metrics["training"]["warmup_adversarial"] is True
    card = (out / "README.md").read_text()
    assert "2 warm-up (output-space adversarial, weight 0.5) + 2 CPSL" in card
    assert "| lambda_adv | `0.5` |" in card and "| adversarial_loss | `ls` |" in card
    model = AutoModel.from_pretrained(out)
    exported = trainer.student.state_dict()
    assert model.state_dict().keys() == exported.keys()  # the export is the student alone, no D
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, exported[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------ the losses
@pytest.mark.parametrize("loss_type", ["vanilla", "ls"])
def test_losses_equal_an_independent_computation(loss_type):
    torch.manual_seed(0)
    discriminator = OutputDiscriminator(num_classes=3, ndf=4)
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(2, 3, 64, 32, generator=generator).softmax(dim=1)
    target = torch.randn(1, 3, 64, 32, generator=generator).softmax(dim=1)

    # An independent discriminator: the same layers applied by hand, one image at a time.
    def forward(image):
        x = image[None]
        convs = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [c.out_channels for c in convs] == [4, 8, 16, 32, 1]
        for index, conv in enumerate(convs):
            x = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
            if index < 4:
                x = torch.where(x > 0, x, 0.2 * x)
        return x[0]

    with torch.no_grad():
        source_logits = torch.stack([forward(image) for image in source])
        target_logits = torch.stack([forward(image) for image in target])
    assert source_logits.shape == (2, 1, 2, 1)  # 64 x 32 / 32

    if loss_type == "vanilla":  # BCE with logits against 0 is softplus(x), against 1 softplus(-x)
        expected_generator = torch.log1p(target_logits.exp()).mean()
        expected_discriminator = (
            torch.log1p(source_logits.exp()).mean() + torch.log1p((-target_logits).exp()).mean()
        )
    else:  # least squares against the 0 / 1 maps
        expected_generator = (target_logits**2).mean()
        expected_discriminator = (source_logits**2).mean() + ((target_logits - 1) ** 2).mean()

    torch.testing.assert_close(generator_loss(discriminator, target, loss_type), expected_generator)
    torch.testing.assert_close(
        discriminator_loss(discriminator, source, target, loss_type), expected_discriminator
    )
    torch.testing.assert_close(domain_loss(target_logits, 0.0, loss_type), expected_generator, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least 32 x 32"):
        discriminator(torch.rand(1, 3, 31, 64))


# ------------------------------------------------------------------------------------------------ gradients
def test_generator_and_discriminator_gradients_stay_apart(tmp_path, synthetic_cache):
    trainer = Trainer(parse_args(tiny_argv(tmp_path / "grads", synthetic_cache, "--lambda_adv", "1.0")))
    trainer.setup()
    discriminator = trainer.accelerator.unwrap_model(stage_named(trainer, "warmup").discriminator)
    student_parameters = [p for p in trainer.student.parameters() if p.requires_grad]
    source_batch = trainer.next_batch(trainer.source_loader)
    target_batch = trainer.next_batch(trainer.target_loader)
    losses = stage_named(trainer, "warmup").losses(source_batch, target_batch).losses
    torch.testing.assert_close(losses["loss"], losses["loss_source"] + losses["loss_adv"])
    assert losses["loss_discriminator"].requires_grad and not losses["loss_adv"].requires_grad

    losses["loss"].backward()  # the generator step
    assert all(p.grad is None for p in discriminator.parameters())
    assert all(p.requires_grad for p in discriminator.parameters())
    head_grads = [p.grad for p in trainer.student.decode_head.parameters() if p.grad is not None]
    assert head_grads and any(bool(g.abs().sum() > 0) for g in head_grads)

    trainer.student.zero_grad(set_to_none=True)
    losses["loss_discriminator"].backward()  # the discriminator step
    assert all(p.grad is None for p in student_parameters)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in discriminator.parameters())


# ------------------------------------------------------------------------------------------------ resume
def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    state.update({f"discriminator.{k}": v for k, v in _discriminator_state(trainer).items()})
    adam = stage_named(trainer, "warmup").optimizer.optimizer.state_dict()
    for index, moments in adam["state"].items():
        state.update({f"discriminator_adam.{index}.{k}": v for k, v in moments.items()})
    state["discriminator_lr"] = torch.tensor(
        stage_named(trainer, "warmup").optimizer.optimizer.param_groups[0]["lr"]
    )
    return state


def test_resume_inside_the_warmup_equals_a_straight_run(tmp_path, synthetic_cache):
    common = ("--deterministic", "--warmup_steps", "3", "--cpsl_steps", "0", "--checkpointing_steps", "100")
    straight = run(tiny_argv(tmp_path / "straight", synthetic_cache, *common))
    assert straight.step == 3

    resumed_dir = tmp_path / "resumed"
    first = run(tiny_argv(resumed_dir, synthetic_cache, *common, "--stop_at_step", "2"))
    assert first.step == 2
    checkpoint = find_latest_checkpoint(resumed_dir)
    assert checkpoint.name == "checkpoint-2"
    assert (checkpoint / "model_1.safetensors").is_file() and (checkpoint / "optimizer_1.bin").is_file()
    resumed = run(tiny_argv(resumed_dir, synthetic_cache, *common, "--resume_from_checkpoint", "latest"))
    assert resumed.step == 3

    expected, actual = _state(straight), _state(resumed)
    assert actual.keys() == expected.keys()
    assert any(name.startswith("discriminator_adam.") for name in expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)


DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    class Recorded(Trainer):
        def setup(self):
            super().setup()
            plain = self.accelerator.unwrap_model(self.stages[0].discriminator)
            self.initial = {k: v.clone() for k, v in plain.state_dict().items()}

    trainer = Recorded(parse_args(sys.argv[2:]))
    trainer.train()
    discriminator = trainer.stages[0].discriminator
    state = {
        "student": trainer.student.state_dict(),
        "discriminator": trainer.accelerator.unwrap_model(discriminator).state_dict(),
        "initial_discriminator": trainer.initial,
        "wrapper": type(discriminator).__name__,
        "world": trainer.accelerator.num_processes,
    }
    torch.save(state, f"{sys.argv[1]}/rank{trainer.accelerator.process_index}.pt")
    """
)


@pytest.mark.slow
def test_two_processes_train_the_discriminator_identically(tmp_path, synthetic_cache):
    run(
        shared_tiny_argv(tmp_path / "warm", synthetic_cache, "--warmup_steps", "1", "--cpsl_steps", "0")
    )  # data cache
    argv = tiny_argv(
        tmp_path / "ddp", synthetic_cache, "--source_batch_size", "1", "--target_batch_size", "1",
        "--gradient_accumulation_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "4",
    )  # fmt: skip
    run_two_processes(DRIVER, tmp_path, argv)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["wrapper"] == "DistributedDataParallel"
    for part in ("student", "discriminator"):
        for name, tensor in rank0[part].items():
            torch.testing.assert_close(rank1[part][name], tensor, rtol=0, atol=0, msg=f"{part}.{name}")
    initial = rank0["initial_discriminator"]
    assert all(not torch.equal(rank0["discriminator"][name], initial[name]) for name in initial)
    checkpoint = tmp_path / "ddp" / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "model_1.safetensors").is_file()  # D saved inside the warm-up


# -------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--warmup_adversarial", "--warmup_steps", "0"], "--warmup_steps"),
        (
            ["--warmup_adversarial", "--crop_size", "16", "64", "--synthetic_image_size", "64", "64"],
            "--crop_size",
        ),
        (["--warmup_adversarial", "--adversarial_loss", "wgan"], "--adversarial_loss"),
        (["--lambda_adv", "-0.1"], "--lambda_adv"),
        (["--discriminator_lr", "0"], "--discriminator_lr"),
    ],
)
def test_bad_adversarial_settings_name_the_argument(argv, named, capsys):
    with pytest.raises((ConfigurationError, SystemExit)) as raised:
        parse_args(argv)
    message = str(raised.value) if raised.type is ConfigurationError else capsys.readouterr().err
    assert named in message


def test_adversarial_defaults_and_recipe(tmp_path):
    defaults = parse_args([]).adversarial
    assert defaults.warmup_adversarial is False
    assert (defaults.lambda_adv, defaults.adversarial_loss, defaults.discriminator_lr) == (0.01, "ls", 1e-4)
    config = tmp_path / "bad.yaml"
    config.write_text("adversarial:\n  warmup_adversarial: true\n  adversarial_loss: hinge\n")
    with pytest.raises(ConfigurationError, match="--adversarial_loss"):
        parse_args(["--config", str(config)])
    config.write_text("adversarial:\n  warmup_adversarial: true\n  adversarial_loss: vanilla\n")
    args = parse_args(["--config", str(config)])
    assert (args.adversarial.warmup_adversarial, args.adversarial.adversarial_loss) == (True, "vanilla")
    config.write_text("training:\n  lambda_adv: 0.1\n")  # the warm-up's settings live in adversarial:
    with pytest.raises(
        ConfigurationError, match="lambda_adv is in section training: but belongs in section adversarial:"
    ):
        parse_args(["--config", str(config)])


def test_a_non_finite_discriminator_step_leaves_d_and_its_adam_unchanged(tmp_path, synthetic_cache):
    trainer = Trainer(parse_args(tiny_argv(tmp_path / "nan", synthetic_cache, "--lambda_adv", "1.0")))
    trainer.setup()
    stage = stage_named(trainer, "warmup")
    discriminator = trainer.accelerator.unwrap_model(stage.discriminator)
    source_batch = trainer.next_batch(trainer.source_loader)
    target_batch = trainer.next_batch(trainer.target_loader)

    output = stage.losses(source_batch, target_batch)
    before = _copy(discriminator.state_dict())
    output.losses["loss_discriminator"] = output.losses["loss_discriminator"] * float("nan")
    stage.after_micro_step(output)
    for name, tensor in discriminator.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    adam = stage.optimizer.optimizer.state
    assert all(float(state["step"]) == 0 for state in adam.values())  # no step taken, nor counted

    output = stage.losses(source_batch, target_batch)  # a finite step does train D
    stage.after_micro_step(output)
    changed = [
        name for name, tensor in discriminator.state_dict().items() if not torch.equal(tensor, before[name])
    ]
    assert sorted(changed) == sorted(before)
