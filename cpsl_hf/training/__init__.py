"""The UDA trainer: arguments (HfArgumentParser + YAML recipes), the generic Accelerate loop (``loop``), the
stages it runs (``stages/``: warm-up, CPSL or the mean-teacher baseline, distillation rounds), the EMA teacher,
atomic checkpoints and the export (``export``).

``from cpsl_hf.training import parse_args, train`` is the whole programmatic API of ``scripts/train.py``.
Names are resolved lazily so that importing the package does not import ``accelerate``.
"""

from cpsl_hf._lazy import lazy_getattr

_EXPORTS = {
    "ConfigurationError": "arguments",
    "ModelArguments": "arguments",
    "DataArguments": "arguments",
    "CPSLArguments": "arguments",
    "AdversarialWarmupArguments": "arguments",
    "DistillArguments": "arguments",
    "UDATrainingArguments": "arguments",
    "RunArguments": "arguments",
    "parse_args": "arguments",
    "EMATeacher": "ema",
    "find_latest_checkpoint": "checkpointing",
    "Trainer": "loop",
    "train": "loop",
    "Stage": "stages",
    "StepOutput": "stages",
    "build_stages": "stages",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
