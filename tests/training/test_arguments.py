"""Arguments of the trainer: YAML recipes + command line, and configuration errors that name the argument."""

from pathlib import Path

import pytest

from cpsl_hf.training.arguments import (
    SECTIONS,
    AdversarialWarmupArguments,
    ConfigurationError,
    CPSLArguments,
    DistillArguments,
    UDATrainingArguments,
    parse_args,
    validate_against_datasets,
)
from cpsl_hf.training.loop import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CLASS_TABLE = Path(__file__).resolve().parent / "two_classes.yaml"


def test_demo_config_equals_the_defaults():
    """`accelerate launch scripts/train.py` without arguments runs exactly configs/synthetic_demo.yaml."""
    defaults = parse_args([]).to_dict()
    from_file = parse_args(["--config", str(CONFIGS / "synthetic_demo.yaml")]).to_dict()
    assert from_file["training"].pop("config") == str(CONFIGS / "synthetic_demo.yaml")
    assert defaults["training"].pop("config") is None
    assert from_file == defaults


def test_command_line_overrides_the_config(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("training:\n  warmup_steps: 7\n  learning_rate: 0.5\ncpsl:\n  lambda_sl: 0.3\n")
    args = parse_args(["--config", str(config), "--warmup_steps", "11"])
    assert args.training.warmup_steps == 11  # CLI wins
    assert args.training.learning_rate == 0.5  # from the file
    assert args.cpsl.lambda_sl == 0.3
    assert args.cpsl.lambda_reg == 5.0  # default


def test_default_output_dir_names_source_target_and_backbone():
    args = parse_args(["--backbone", "segformer-b0"])
    assert args.training.output_dir == str(Path("outputs") / "synthetic_to_synthetic_segformer-b0")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_recipe_parses(name, tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "target").mkdir()
    args = parse_args(
        [
            "--config",
            str(CONFIGS / name),
            "--source_dir",
            str(tmp_path / "source"),
            "--target_dir",
            str(tmp_path / "target"),
            *(["--class_table", str(CLASS_TABLE)] if name.startswith("folder") else []),
        ]
    )
    if name.startswith("cityscapes_"):  # Cityscapes -> ACDC / Dark Zurich: the benchmark readers
        assert args.data.source == "cityscapes" and args.data.num_classes == 19
        assert args.data.target == {"acdc": "acdc", "darkzurich": "dark_zurich"}[name.split("_")[1]]
    if name.startswith("folder"):  # the classes come from the table
        assert args.data.num_classes == 2 and args.data.class_table == str(CLASS_TABLE)
    if "synthia" in name:
        assert args.data.num_classes == 16
    if "segformer_b5" in name:
        assert args.training.optimizer == "adamw" and args.training.learning_rate == 6e-5
        assert args.training.head_lr_multiplier == 10 and args.data.crop_size == [512, 512]
        assert (args.training.source_batch_size, args.training.target_batch_size) == (2, 2)
        assert args.training.cpsl_steps == 40000
    if "deeplabv2" in name:
        assert args.training.optimizer == "sgd" and args.training.learning_rate == 1e-4
        assert args.training.learning_rate * args.training.head_lr_multiplier == pytest.approx(5e-4)
        assert args.training.weight_decay == 2e-4 and args.data.crop_size == [512, 896]
        assert (args.cpsl.samples_per_image, args.cpsl.bank_size, args.cpsl.ema_momentum) == (
            256,
            65536,
            0.999,
        )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--source", "imagenet"], "--source"),
        (["--target", "not a dataset"], "--target"),
        (["--source", "gta5"], "--source_dir"),
        (["--target", "cityscapes", "--target_dir", "/nonexistent/cityscapes"], "--target_dir"),
        (["--num_classes", "16"], "--num_classes"),  # synthetic has 19 classes
        (["--num_classes", "7"], "--num_classes"),
        (["--crop_size", "256", "128"], "--crop_size"),  # synthetic images are 128 x 256
        (["--crop_size", "64", "64", "--target_resize", "32", "100"], "--crop_size"),
        (["--optimizer", "lamb"], "--optimizer"),
        (["--push_to_hub"], "--push_to_hub"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "--resume_from_checkpoint"),
        (["--ema_momentum", "1.5"], "--ema_momentum"),
        (
            ["--method", "mean_teacher"],
            "--consistency reference",
        ),  # the default consistency needs the SL head
        (["--pseudo_label_threshold", "1.0"], "--pseudo_label_threshold"),
        (["--prototype_lr", "0"], "--prototype_lr"),
        (["--bank_size", "-1"], "--bank_size"),
        # loss weights, temperature and optimisation ranges
        (["--lambda_sl", "-0.1"], "--lambda_sl"),
        (["--lambda_reg", "-1"], "--lambda_reg"),
        (["--lambda_adv", "-0.5"], "--lambda_adv"),
        (["--sl_temperature", "0"], "--sl_temperature"),
        (["--head_lr_multiplier", "0"], "--head_lr_multiplier"),
        (["--cpsl_lr_scale", "-1"], "--cpsl_lr_scale"),
        (["--weight_decay", "-0.01"], "--weight_decay"),
        (["--poly_power", "-1"], "--poly_power"),
        (["--max_grad_norm", "0"], "--max_grad_norm"),
        (["--sgd_momentum", "1.0"], "--sgd_momentum"),
        (["--sgd_momentum", "-0.1"], "--sgd_momentum"),
        (["--adam_betas", "0.9", "1.0"], "--adam_betas"),
        (["--adam_betas", "-0.1", "0.999"], "--adam_betas"),
        (["--lr_warmup_steps", "-1"], "--lr_warmup_steps"),
    ],
)
def test_bad_configuration_names_the_argument(argv, named, capsys):
    with pytest.raises((ConfigurationError, SystemExit)) as info:
        parse_args(argv)
    message = str(info.value) if info.type is ConfigurationError else capsys.readouterr().err  # argparse's
    assert named in message


def test_each_group_validates_itself():
    for group in SECTIONS.values():
        group().validate()  # the defaults are valid
    with pytest.raises(ConfigurationError, match="--distill_threshold 1.5 must lie in"):
        DistillArguments(distill_threshold=1.5).validate()
    with pytest.raises(ConfigurationError, match="--discriminator_lr 0 must be positive"):
        AdversarialWarmupArguments(discriminator_lr=0).validate()
    with pytest.raises(ConfigurationError, match="--lambda_reg -1 must be >= 0"):
        CPSLArguments(lambda_reg=-1).validate()
    with pytest.raises(ConfigurationError, match="--adam_betas"):  # a YAML list can have any length
        UDATrainingArguments(adam_betas=[0.9]).validate()
    with pytest.raises(ConfigurationError, match="--weight_decay nan must be >= 0"):
        UDATrainingArguments(weight_decay=float("nan")).validate()
    # The groups are the run's attributes and its dict's sections (metrics.json, checkpoints).
    args = parse_args(["--distill_rounds", "2", "--warmup_adversarial"])
    assert (
        list(args.to_dict())
        == list(SECTIONS)
        == ["model", "data", "cpsl", "adversarial", "distill", "training"]
    )
    assert args.to_dict()["distill"]["distill_rounds"] == 2 and args.adversarial.warmup_adversarial is True
    assert "distill_rounds" not in args.to_dict()["training"]


def test_bad_yaml_values_are_caught(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("cpsl:\n  sampling: stratified\n")
    with pytest.raises(ConfigurationError, match="--sampling"):
        parse_args(["--config", str(config)])
    config.write_text("model:\n  segformer_embedding: relu\n")  # an optional choice: unset or one of them
    with pytest.raises(ConfigurationError, match="--segformer_embedding 'relu'"):
        parse_args(["--config", str(config)])
    config.write_text("cpsl:\n  pseudo_labels: online\n")  # renamed: teacher
    with pytest.raises(ConfigurationError, match="frozen | offline | teacher"):
        parse_args(["--config", str(config)])
    config.write_text("training:\n  warmup_stepz: 3\n")
    with pytest.raises(ConfigurationError, match="warmup_stepz"):
        parse_args(["--config", str(config)])
    with pytest.raises(ConfigurationError, match="--config"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_recipe_sections_hold_their_own_arguments(tmp_path):
    config = tmp_path / "recipe.yaml"
    for text, misplaced in (
        ("training:\n  distill_rounds: 2\n", "distill_rounds is in section training: but belongs in section distill:"),
        ("model:\n  lambda_sl: 0.2\n", "lambda_sl is in section model: but belongs in section cpsl:"),
        ("cpsl:\n  warmup_adversarial: true\n", "warmup_adversarial is in section cpsl: but belongs in section adversarial:"),
        ("distill:\n  warmup_steps: 3\n", "warmup_steps is in section distill: but belongs in section training:"),
    ):  # fmt: skip
        config.write_text(text)
        with pytest.raises(ConfigurationError, match=misplaced):
            parse_args(["--config", str(config)])
    config.write_text(
        "training:\n  lambda_adv: 0.2\n  seed: 3\n  distill_steps: 4\n"
    )  # every misplaced key is named
    with pytest.raises(ConfigurationError) as info:
        parse_args(["--config", str(config)])
    assert "lambda_adv is in section training:" in str(info.value) and "distill_steps" in str(info.value)
    assert "seed" not in str(info.value)


def test_unknown_recipe_sections_are_refused(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("optimisation:\n  learning_rate: 0.1\n")
    with pytest.raises(
        ConfigurationError, match="unknown section 'optimisation'; the sections are model, data"
    ):
        parse_args(["--config", str(config)])
    config.write_text("training: 3\n")
    with pytest.raises(ConfigurationError, match="section training: expected a mapping"):
        parse_args(["--config", str(config)])


def test_flat_recipe_keys_still_work(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(
        "warmup_steps: 5\ndistill_rounds: 1\nlambda_adv: 0.2\nlambda_sl: 0.3\ndistill:\n  distill_steps: 4\nadversarial:\n"
    )
    args = parse_args(["--config", str(config)])
    assert (args.training.warmup_steps, args.cpsl.lambda_sl, args.adversarial.lambda_adv) == (5, 0.3, 0.2)
    assert (args.distill.distill_rounds, args.distill.distill_steps) == (1, 4)


def test_an_argument_given_twice_in_a_recipe_is_refused(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("lambda_sl: 0.3\ncpsl:\n  lambda_sl: 0.5\n")
    with pytest.raises(ConfigurationError, match="lambda_sl is given twice; keep one"):
        parse_args(["--config", str(config)])


def test_synthia_with_19_classes_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="--num_classes 19 disagrees with --source synthia"):
        parse_args(["--source", "synthia", "--source_dir", str(tmp_path)])


def test_dataset_checks_name_the_argument():
    args = parse_args(["--crop_size", "64", "64"])
    validate_against_datasets(args, (64, 64), (100, 200), 18, 18)  # fits
    with pytest.raises(ConfigurationError, match="--crop_size 64 64 is larger than the target images"):
        validate_against_datasets(args, (64, 64), (48, 200), None, None)
    with pytest.raises(ConfigurationError, match="--num_classes 19 disagrees with --source"):
        validate_against_datasets(args, (64, 64), (64, 64), 19, None)


def test_learning_rate_schedule_restarts_per_stage():
    stage_lr_factor = Trainer(
        parse_args(["--warmup_steps", "10", "--cpsl_steps", "20", "--lr_warmup_steps", "2", "--poly_power", "1",
                    "--cpsl_lr_scale", "0.5"])
    ).lr_factor  # fmt: skip
    assert stage_lr_factor(0) == pytest.approx(0.5)  # linear warm-up (1/2)
    assert stage_lr_factor(1) == pytest.approx(1.0 * (1 - 1 / 10))
    assert stage_lr_factor(5) == pytest.approx(0.5)
    assert stage_lr_factor(10) == pytest.approx(0.5 * 0.5)  # CPSL stage restarts, scaled, ramping
    assert stage_lr_factor(20) == pytest.approx(0.5 * (1 - 10 / 20))
    assert stage_lr_factor(30) == 0.0


def test_help_lists_every_argument():
    """argparse formats help strings with %: a stray % in one breaks `--help` for every argument."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "scripts/train.py", "--help"],
        capture_output=True, text=True, timeout=120, cwd=CONFIGS.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--method", "--pseudo_labels", "--prototype_optimizer", "--teacher_mode", "--ema_momentum"):
        assert flag in result.stdout
