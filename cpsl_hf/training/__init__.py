"""The UDA trainer: arguments (HfArgumentParser + YAML recipes), the EMA teacher, atomic checkpoints and the
Accelerate training loop (warm-up -> init -> CPSL -> evaluation -> export).

``from cpsl_hf.training import parse_args, train`` is the whole programmatic API of ``scripts/train.py``.
Names are resolved lazily so that importing the package does not import ``accelerate``.
"""

import importlib

_EXPORTS = {
    "ConfigurationError": "arguments",
    "ModelArguments": "arguments",
    "DataArguments": "arguments",
    "CPSLArguments": "arguments",
    "UDATrainingArguments": "arguments",
    "RunArguments": "arguments",
    "parse_args": "arguments",
    "EMATeacher": "ema",
    "find_latest_checkpoint": "checkpointing",
    "UDATrainer": "trainer",
    "train": "trainer",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
