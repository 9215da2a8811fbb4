"""The Hub: model cards rendered from ``model_cards/model_card.md.jinja`` and pushing checkpoint folders.

- :func:`render_model_card` / :func:`write_model_card` turn the evaluation metrics (the dict of
  :func:`cpsl_hf.evaluation.evaluate_model`) and a few facts about the run into a ``README.md`` whose YAML
  metadata carries a ``model-index`` (mIoU on the target validation set, per label protocol) that
  ``huggingface_hub.ModelCard`` parses back.
- :func:`push_checkpoint` uploads a finished checkpoint folder with ``huggingface_hub`` (``create_repo`` +
  ``create_commit``, every local path redacted from the text files). It fails at once, with a message that says why, when ``HF_HUB_OFFLINE=1`` is set, when
  there is no token, or when the Hub cannot be reached (one short request checks before anything is uploaded).
- :func:`publish_checkpoint` writes the card from ``metrics.json`` / ``training_info.json`` and pushes: what
  ``scripts/push_to_hub.py`` and the trainer's ``--push_to_hub`` run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cpsl_hf.data.protocols import class_names as protocol_class_names
from cpsl_hf.data.registry import is_hub_repo_id
from cpsl_hf.provenance import METRICS_FILENAME, card_dataset_ids
from cpsl_hf.utils import MissingPathError, UsageError, format_percent
from cpsl_hf.visualization import PREDICTIONS_DIRNAME

#: The template shipped in the repository's top-level ``model_cards/`` folder.
DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "model_card.md.jinja"

#: Files a checkpoint folder must hold to be pushed (loadable with ``from_pretrained``).
REQUIRED_CHECKPOINT_FILES = ("config.json", "model.safetensors")

#: Training state that stays local: resuming needs it, people loading the model do not.
DEFAULT_IGNORE_PATTERNS = (
    "*.pt",
    "*.pth",
    "*.bin",
    "*.pkl",
    "optimizer*",
    "scheduler*",
    "random_states*",
    "training_state/*",
    "trainer_state/*",
    "checkpoints/*",  # the trainer's resumable checkpoints (cpsl_hf.training.checkpointing)
    ".cpsl-run.lock",  # the running trainer's claim on its folder (cpsl_hf.training.run_folder)
)

#: Seconds allowed to connect to / hear back from the Hub on the first request before giving up.
HUB_CHECK_TIMEOUT_S = 10.0

TRAINING_INFO_FILENAME = "training_info.json"

CPSL_CITATION = """@inproceedings{li2022cpsl,
  author    = {Li, Ruihuang and Li, Shuai and He, Chenhang and Zhang, Yabin and Jia, Xu and Zhang, Lei},
  title     = {Class-Balanced Pixel-Level Self-Labeling for Domain Adaptive Semantic Segmentation},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {11593--11603},
  year      = {2022}
}"""

_DEFAULT_SOURCE = {19: "GTA5", 16: "SYNTHIA", 13: "SYNTHIA"}


class HubError(RuntimeError):
    """The push cannot happen (offline mode, no token, Hub unreachable, token rejected)."""


# ----------------------------------------------------------------------------------------------- model card


def _require_fraction(metrics: Mapping[str, Any], key: str) -> float:
    if key not in metrics:
        raise ValueError(f"metrics has no {key!r} (expected the dict of cpsl_hf.evaluation.evaluate_model)")
    value = metrics[key]
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"metrics[{key!r}] must be a finite fraction in [0, 1], got {value!r}")
    return float(value)


def _format_gain(before: float | None, after: float | None) -> str:
    """``after - before`` in IoU points with a sign (``+3.91``), ``n/a`` when either is undefined."""
    if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
        return "n/a"
    return f"{100.0 * (after - before):+.2f}"


def _config_display(config: str) -> str:
    """A recipe file as the card shows it: ``configs/NAME`` for one shipped in the repository's ``configs/``,
    else the file's name alone (never a local path)."""
    path = Path(config)
    shipped = DEFAULT_TEMPLATE_PATH.parent.parent / "configs" / path.name
    if path.parent.name == "configs" and shipped.is_file():
        return f"configs/{path.name}"
    return path.name if (path.is_absolute() or os.sep in config) else config


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


_PSEUDO_LABEL_SOURCES = {
    "frozen": "the frozen warm-up model",
    "offline": "the warm-up model (computed once over the target set)",
    "teacher": "the EMA teacher",
}
"""How the card names each ``--pseudo_labels`` source."""


def _card_context(metrics: Mapping[str, Any], training_info: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the template needs, validated; the YAML metadata is built with ``huggingface_hub``."""
    from huggingface_hub import EvalResult, ModelCardData

    mean_iou = _require_fraction(metrics, "mean_iou")
    per_category_iou = list(metrics.get("per_category_iou", []))
    num_classes = int(metrics.get("num_classes") or training_info.get("num_classes") or len(per_category_iou))
    names = list(metrics.get("class_names") or protocol_class_names(num_classes))
    if len(per_category_iou) != num_classes or len(names) != num_classes:
        raise ValueError(
            f"metrics: per_category_iou has {len(per_category_iou)} values and class_names {len(names)} names, "
            f"but the protocol has {num_classes} classes"
        )
    per_category_accuracy = list(metrics.get("per_category_accuracy") or [None] * num_classes)

    model_name = str(training_info.get("model_name", "cpsl-segformer"))
    source = str(training_info.get("source_dataset", _DEFAULT_SOURCE.get(num_classes, "source")))
    target = str(training_info.get("target_dataset", "Cityscapes"))
    split = str(training_info.get("eval_split", "validation"))
    dataset_name = f"{target} ({split}), {source} to {target}"
    dataset_type = str(training_info.get("eval_dataset_id", target.lower()))

    def result(value: float, metric_name: str, metric_type: str = "mean_iou") -> EvalResult:
        return EvalResult(
            task_type="image-segmentation",
            task_name="Semantic Segmentation",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=value,
        )

    headline = [(f"mIoU ({num_classes} classes)", mean_iou)]
    eval_results = [result(mean_iou, f"mIoU ({num_classes} classes)")]
    if "mean_iou_13" in metrics:
        mean_iou_13 = _require_fraction(metrics, "mean_iou_13")
        headline.append(("mIoU (13 classes)", mean_iou_13))
        eval_results.append(result(mean_iou_13, "mIoU (13 classes)"))
    if "overall_accuracy" in metrics:
        pixel_accuracy = _require_fraction(metrics, "overall_accuracy")
        headline.append(("Pixel accuracy", pixel_accuracy))
        eval_results.append(result(pixel_accuracy, "Pixel accuracy", metric_type="accuracy"))

    datasets = training_info.get("datasets")
    if datasets is None:
        datasets = card_dataset_ids([source.lower(), target.lower()])
    base_model = training_info.get("base_model")
    if base_model is not None and (not isinstance(base_model, str) or not is_hub_repo_id(base_model)):
        raise ValueError(
            f"training_info['base_model'] must be a Hub repo id such as 'nvidia/mit-b5', got {base_model!r} "
            "(a local folder is no base model on the Hub: leave it out)"
        )
    street_scenes = num_classes in (19, 16, 13) and names == protocol_class_names(num_classes)
    tags = ["image-segmentation", "semantic-segmentation", "domain-adaptation", "cpsl"]
    tags += ["cityscapes"] if street_scenes else []
    tags += [tag for tag in training_info.get("tags", []) if tag not in tags]
    relation = {"base_model_relation": "finetune"} if base_model else {}
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="image-segmentation",
        base_model=base_model,
        datasets=list(datasets) or None,
        tags=tags,
        model_name=model_name,
        eval_results=eval_results,
        **relation,
    )

    recipe: list[tuple[str, str]] = []
    known = {
        "config": "Config",
        "architecture": "Architecture",
        "stage": "Stage",
        "steps": "Training steps",
        "batch_size": "Batch size (source + target)",
        "crop_size": "Crop size",
        "seed": "Seed",
        "hardware": "Hardware",
        "mixed_precision": "Mixed precision",
        "evaluation": "Evaluation",
    }
    for key, label in known.items():
        if training_info.get(key) is not None:
            recipe.append((label, str(training_info[key])))
    if training_info.get("training_time_s") is not None:
        recipe.append(("Training time", _format_duration(float(training_info["training_time_s"]))))
    hyperparameters = dict(training_info.get("hyperparameters") or {})

    reference = training_info.get("reference_metrics")
    reference_iou = list(reference["per_category_iou"]) if reference else [None] * num_classes
    if len(reference_iou) != num_classes:
        raise ValueError(
            f"training_info['reference_metrics'] has {len(reference_iou)} per-class IoUs, the protocol {num_classes}"
        )
    rows = [
        {
            "name": name,
            "iou": format_percent(iou),
            "accuracy": format_percent(accuracy),
            "reference": format_percent(before),
            "gain": _format_gain(before, iou),
        }
        for name, iou, accuracy, before in zip(names, per_category_iou, per_category_accuracy, reference_iou)
    ]
    return {
        "card_data": card_data.to_yaml(),
        "model_name": model_name,
        "street_scenes": street_scenes,
        "source_kind": "labelled renders"
        if source.split()[0].lower() in ("gta5", "synthia", "synthetic")
        else "labelled",
        "repo_id": str(training_info.get("repo_id", f"your-username/{model_name}")),
        "num_classes": num_classes,
        "source": source,
        "target": target,
        "split": split,
        "headline": [(name, format_percent(value), value) for name, value in headline],
        "rows": rows,
        "has_accuracy": any(accuracy is not None for accuracy in per_category_accuracy),
        "recipe": recipe,
        "hyperparameters": sorted(hyperparameters.items()),
        "has_reference": reference is not None,
        "reference_miou": format_percent(reference["mean_iou"]) if reference else None,
        "miou": format_percent(mean_iou),
        "miou_gain": _format_gain(reference["mean_iou"], mean_iou) if reference else None,
        "plots": [(plot["title"], plot["path"]) for plot in training_info.get("plots") or []],
        "base_model": base_model,
        "example_images": list(training_info.get("example_images") or []),
        "citation": CPSL_CITATION,
        "method": str(training_info.get("method", "cpsl")),
        "pseudo_label_source": _PSEUDO_LABEL_SOURCES.get(
            str(training_info.get("pseudo_labels", "teacher")), "the EMA teacher"
        ),
    }


def render_model_card(
    metrics: Mapping[str, Any],
    training_info: Mapping[str, Any],
    template_path: str | os.PathLike | None = None,
) -> str:
    """Render the model card (``README.md`` text: YAML metadata + Markdown) from the Jinja template.

    Args:
        metrics: evaluation on the target validation set, as returned by
            :func:`cpsl_hf.evaluation.evaluate_model`: ``mean_iou`` and ``per_category_iou`` (fractions in
            ``[0, 1]``; NaN for a class absent from the split) are required; ``mean_iou_13`` (16-class
            protocol), ``overall_accuracy``, ``per_category_accuracy``, ``class_names``, ``num_classes`` are used
            when present. The ``model-index`` stores the values exactly as given (fractions).
        training_info: facts about the run, all optional: ``model_name``, ``repo_id``, ``source_dataset``,
            ``target_dataset``, ``eval_split``, ``eval_dataset_id``, ``datasets`` (Hub ids for the metadata),
            ``base_model`` (e.g. ``nvidia/mit-b5``), ``tags``, ``config``, ``architecture``, ``stage``, ``steps``,
            ``batch_size``, ``crop_size``, ``seed``, ``hardware``, ``mixed_precision``, ``evaluation``,
            ``training_time_s``, ``hyperparameters`` (dict), ``example_images`` (paths relative to the card),
            ``method`` (``cpsl`` or ``mean_teacher``), ``pseudo_labels`` (``frozen``, ``offline``, ``teacher``).
        template_path: a Jinja template to use instead of ``model_cards/model_card.md.jinja``.
    """
    import jinja2

    path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {path} not found"
            + (
                " (it ships in the repository's model_cards/ folder; pass template_path= when cpsl_hf is "
                "installed without it)"
                if template_path is None
                else ""
            )
        )
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
    )
    template = environment.from_string(path.read_text(encoding="utf-8"))
    return template.render(**_card_context(metrics, training_info))


def write_model_card(
    output_dir: str | os.PathLike,
    metrics: Mapping[str, Any],
    training_info: Mapping[str, Any],
    template_path: str | os.PathLike | None = None,
) -> Path:
    """Render the card into ``output_dir/README.md`` and return its path.

    When ``training_info`` names no ``example_images``, the strips that
    :func:`cpsl_hf.visualization.save_prediction_strips` saved in ``output_dir/predictions/`` are shown.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise NotADirectoryError(f"write_model_card: {output_dir} is not a folder")
    info = dict(training_info)
    if not info.get("example_images"):
        strips = sorted((output_dir / PREDICTIONS_DIRNAME).glob("*.png"))
        info["example_images"] = [strip.relative_to(output_dir).as_posix() for strip in strips]
    path = output_dir / "README.md"
    path.write_text(render_model_card(metrics, info, template_path), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- push


def validate_checkpoint(checkpoint_dir: str | os.PathLike) -> Path:
    """Check that ``checkpoint_dir`` is a folder holding :data:`REQUIRED_CHECKPOINT_FILES`; return it."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise MissingPathError(f"--checkpoint {folder}: does not exist or is not a folder")
    for name in REQUIRED_CHECKPOINT_FILES:
        if not (folder / name).is_file():
            raise MissingPathError(
                f"--checkpoint {folder}: has no {name}, so it is not a model folder "
                "(save the model with save_pretrained() before pushing)"
            )
    return folder


def check_repo_id(repo_id: str) -> str:
    """Raise :class:`~cpsl_hf.utils.UsageError` unless ``repo_id`` is ``NAME`` or ``USER/NAME``; return it."""
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise UsageError(f"--repo_id {repo_id!r}: must be 'NAME' or 'USER/NAME'")
    return repo_id


def check_hub_access(token: str | None = None, endpoint: str | None = None) -> str:
    """Fail fast unless a push can work: not offline, a token exists, the Hub answers and accepts it.

    One ``GET /api/whoami-v2`` with a :data:`HUB_CHECK_TIMEOUT_S` timeout and no retries.

    Returns:
        The token to use.

    Raises:
        HubError: with a message that names the cause (offline mode, no token, unreachable, rejected token).
    """
    return _whoami(token, endpoint)[0]


def hub_user(token: str | None = None, endpoint: str | None = None) -> str:
    """The account name that ``token`` belongs to (the same single request as :func:`check_hub_access`), e.g. to
    turn a bare repo ``NAME`` into the ``USER/NAME`` that ``create_repo`` will make."""
    return _whoami(token, endpoint)[1]["name"]


def _whoami(token: str | None, endpoint: str | None) -> tuple[str, dict[str, Any]]:
    """(token, the Hub's whoami answer) after the checks of :func:`check_hub_access`."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import build_hf_headers, get_session

    from cpsl_hf.data.readers import hub_offline

    if hub_offline():
        raise HubError("HF_HUB_OFFLINE=1 is set: not pushing to the Hub (unset it to push)")
    token = token or get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token (needs write access)"
        )
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    url = f"{endpoint}/api/whoami-v2"
    try:
        response = get_session().get(url, headers=build_hf_headers(token=token), timeout=HUB_CHECK_TIMEOUT_S)
    except Exception as error:  # the HTTP client's connect/read/proxy errors: no network or no Hub there
        raise HubError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({type(error).__name__}: {error}); "
            "check the network connection (or HF_ENDPOINT)"
        ) from error
    if response.status_code == 401:
        raise HubError(
            f"the Hub at {endpoint} rejected the token (401 Unauthorized): log in again or pass --token"
        )
    if response.status_code >= 400:
        raise HubError(
            f"the Hub at {endpoint} answered {response.status_code} to {url}: {response.text[:200]}"
        )
    return token, response.json()


def push_checkpoint(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
    endpoint: str | None = None,
) -> str:
    """Upload a checkpoint folder (model, config, image processor, remote code, card) to a Hub model repo.

    Validates the folder, then :func:`check_hub_access` (fails at once offline / without token / without
    network), then ``create_repo(exist_ok=True)`` and one ``create_commit`` of :func:`upload_operations` (local
    paths redacted from text files). Training state matching
    ``ignore_patterns`` (optimizer, scheduler, RNG states, ``*.pt``/``*.bin`` pickles) stays local.

    Args:
        endpoint: Hub URL; default ``HF_ENDPOINT`` (``https://huggingface.co``).

    Returns:
        The repository URL, e.g. ``https://huggingface.co/USER/NAME``.
    """
    from huggingface_hub import HfApi

    folder = validate_checkpoint(checkpoint_dir)
    check_repo_id(repo_id)
    token = check_hub_access(token, endpoint)
    operations = upload_operations(folder, ignore_patterns)
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.create_commit(
        repo_id=repo_url.repo_id,
        repo_type="model",
        operations=operations,
        commit_message=commit_message or f"Upload CPSL checkpoint {folder.name}",
    )
    return str(repo_url)


#: Never uploaded, as ``upload_folder`` leaves them out: a git folder and huggingface_hub's download cache.
_ALWAYS_IGNORED = (".git/*", ".cache/huggingface/*")


def upload_files(
    folder: str | os.PathLike, ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS
) -> list[str]:
    """The files of ``folder`` a push uploads (POSIX paths relative to it, sorted): all but those matching
    ``ignore_patterns`` (``fnmatch`` on the relative path, as ``upload_folder``) and a ``.git`` folder."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    relative = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(relative, ignore_patterns=[*ignore_patterns, *_ALWAYS_IGNORED]))


def upload_operations(
    folder: str | os.PathLike, ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS
) -> list:
    """``CommitOperationAdd`` of every file of :func:`upload_files`; text files (:data:`provenance.TEXT_SUFFIXES`)
    are uploaded with every local path of the run replaced by ``<local>/NAME`` (:func:`provenance.local_paths`
    of the folder's ``metrics.json`` and ``training_info.json``, the folder, the working and home directories), so
    that nothing pushed shows the author's file system. Binary files (weights, PNGs, event files) go as they are.
    """
    from huggingface_hub import CommitOperationAdd

    from cpsl_hf.provenance import TEXT_SUFFIXES, local_paths, redact_local_paths

    folder = Path(folder)
    records = []
    for name in (METRICS_FILENAME, TRAINING_INFO_FILENAME):
        if (folder / name).is_file():
            try:
                records.append(json.loads((folder / name).read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as error:
                raise UsageError(f"{folder / name}: cannot read it as JSON ({error}); not pushing") from error
    hidden = local_paths(records, folder)
    operations = []
    for relative in upload_files(folder, ignore_patterns):
        path = folder / relative
        if path.suffix.lower() in TEXT_SUFFIXES:
            text = redact_local_paths(path.read_text(encoding="utf-8", errors="surrogateescape"), hidden)
            content = text.encode("utf-8", errors="surrogateescape")
            operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=content))
        else:
            operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=str(path)))
    return operations


def _read_json(path: Path, argument: str) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{argument} {path}: cannot read it as JSON ({error})") from error
    if not isinstance(document, dict):
        raise UsageError(f"{argument} {path}: expected a JSON object, got {type(document).__name__}")
    return document


def card_inputs(
    document: Mapping[str, Any], path: str | os.PathLike = METRICS_FILENAME
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, facts about the run)`` for the model card from either ``metrics.json`` layout.

    - ``scripts/evaluate.py --output`` writes the flat dict of :func:`cpsl_hf.evaluation.evaluate_model`
      (``mean_iou``, ``per_category_iou``, ...): it is the metrics; there are no run facts.
    - The trainer (:func:`cpsl_hf.training.export.export_run`) writes ``{exported_model, final, history,
      pseudo_labels, training}``: the metrics are ``final`` (the exported network's last evaluation, without its
      ``stage`` / ``step``), the run facts come from ``training``.

    Raises :class:`~cpsl_hf.utils.UsageError` naming ``path`` when ``document`` is neither.
    """
    if "mean_iou" in document:
        return dict(document), {}
    final = document.get("final")
    if isinstance(final, Mapping) and "mean_iou" in final:
        metrics = {key: value for key, value in final.items() if key not in ("stage", "step")}
        return metrics, _run_facts(document.get("training") or {}, document.get("exported_model"))
    raise UsageError(
        f"--metrics {path}: neither the output of scripts/evaluate.py (a 'mean_iou' key) nor a training run's "
        f"metrics.json (a 'final' evaluation with 'mean_iou'); it has keys {sorted(document)}"
    )


#: Hyperparameter sections of a run's arguments shown in the card (argument names are unique across them).
_HYPERPARAMETER_SECTIONS = ("cpsl", "adversarial", "distill", "training")

#: Arguments that are places or accounts, not hyperparameters.
_NOT_HYPERPARAMETERS = ("output_dir", "config", "resume_from_checkpoint", "hub_model_id", "logging_dir")


def _hyperparameters(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The card's hyperparameters table: the scalar arguments of :data:`_HYPERPARAMETER_SECTIONS`, without places
    (folders, files, repo ids)."""
    from cpsl_hf.provenance import local_paths

    hidden = local_paths(arguments)
    return {
        key: value
        for section in _HYPERPARAMETER_SECTIONS
        for key, value in (arguments.get(section) or {}).items()
        if isinstance(value, (int, float, str, bool))
        and key not in _NOT_HYPERPARAMETERS
        and not (isinstance(value, str) and any(value.startswith(path) or value == path for path in hidden))
    }


def _run_facts(training: Mapping[str, Any], exported_model: str | None) -> dict[str, Any]:
    """The model card's ``training_info`` from the ``training`` record of a trainer's ``metrics.json``: names of
    datasets, architecture and recipe file, never their local paths."""
    from cpsl_hf.provenance import card_dataset_ids, dataset_display_name

    facts: dict[str, Any] = {}
    data_arguments = (training.get("arguments") or {}).get("data") or {}
    for key, card_key in (("source", "source_dataset"), ("target", "target_dataset")):
        if training.get(key):
            name = str(training[key])
            display = dataset_display_name(name, data_arguments.get(f"{key}_dir"))
            facts[card_key] = f"{display} {key}" if name == "synthetic" else display
    if training.get("source") and training.get("target"):
        facts["datasets"] = card_dataset_ids(
            [(str(training[key]), data_arguments.get(f"{key}_dir")) for key in ("source", "target")]
        )
    for key in (
        "seed", "hardware", "method", "pseudo_labels", "num_classes", "eval_split", "batch_size", "crop_size",
        "mixed_precision", "architecture",
    ):  # fmt: skip
        if training.get(key) is not None:
            facts[key] = training[key]
    if "base_model" in training:  # recorded by the trainer: a Hub repo id or None (never a local path)
        facts["base_model"] = training["base_model"]
    elif (
        training.get("backbone")
        and is_hub_repo_id(training["backbone"])
        and not os.path.isdir(training["backbone"])
    ):
        facts["base_model"] = training["backbone"]  # a record of an older version: a Hub backbone id
    if "architecture" not in facts and training.get("backbone"):
        facts["architecture"] = Path(str(training["backbone"])).name
    if "config" in training:
        facts["config"] = (
            _config_display(str(training["config"]))
            if training["config"]
            else "defaults (configs/synthetic_demo.yaml)"
        )
    if training.get("final_stage"):
        facts["stage"] = f"{training['final_stage']} ({exported_model or 'student'})"
    if training.get("recipe"):
        facts["steps"] = training["recipe"]
    elif training.get("stages"):
        facts["steps"] = " + ".join(f"{stage['steps']} {stage['name']}" for stage in training["stages"])
    if training.get("training_seconds") is not None:
        facts["training_time_s"] = training["training_seconds"]
    if training.get("arguments"):
        facts["hyperparameters"] = _hyperparameters(training["arguments"])
        facts["evaluation"] = "whole image, no flip, at label resolution"
    return facts


def write_run_card(
    model_dir: str | os.PathLike,
    document: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    template_path: str | os.PathLike | None = None,
) -> Path:
    """The card of a trainer's run folder from its ``metrics.json`` record (:func:`card_inputs`): the warm-up
    column and gains of the per-class table (:func:`cpsl_hf.card_plots.reference_metrics`) and the plots of
    :func:`cpsl_hf.card_plots.write_card_plots` (PNG files in ``model_dir/plots/``; without matplotlib a line
    says they were not drawn). ``overrides`` (``model_name``, ``repo_id``, ...) win over the record."""
    from cpsl_hf import card_plots

    metrics, facts = card_inputs(document)
    if facts:  # a trainer's record (not the flat output of scripts/evaluate.py)
        reference = card_plots.reference_metrics(document)
        if reference is not None:
            facts["reference_metrics"] = reference
        if card_plots.matplotlib_available():
            facts["plots"] = [
                dataclasses.asdict(plot) for plot in card_plots.write_card_plots(document, model_dir)
            ]
        else:
            print(
                "model card: matplotlib is not installed, so the card has no plots (pip install 'cpsl-hf[demo]')"
            )
    return write_model_card(model_dir, metrics, {**facts, **(overrides or {})}, template_path)


def publish_checkpoint(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    metrics_file: str | os.PathLike | None = None,
    training_info_file: str | os.PathLike | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    template_path: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> str:
    """Write the model card from the run's metrics, then :func:`push_checkpoint`; returns the repo URL.

    ``metrics_file`` defaults to ``checkpoint_dir/metrics.json``: the output of ``scripts/evaluate.py --output`` or
    the ``metrics.json`` a training run writes (either layout, :func:`card_inputs`), and ``training_info_file`` to ``checkpoint_dir/training_info.json`` (optional). Without a metrics
    file an existing ``README.md`` is pushed as it is; with neither, it refuses (a checkpoint needs a card).
    A bare ``NAME`` becomes ``USER/NAME`` (the token's account) before the card is written, since the card's
    loading code names the repository.
    """
    folder = validate_checkpoint(checkpoint_dir)
    check_repo_id(repo_id)
    metrics_path = Path(metrics_file) if metrics_file is not None else folder / METRICS_FILENAME
    info_path = (
        Path(training_info_file) if training_info_file is not None else folder / TRAINING_INFO_FILENAME
    )
    if metrics_file is not None and not metrics_path.is_file():
        raise MissingPathError(f"--metrics {metrics_path}: no such file")
    if training_info_file is not None and not info_path.is_file():
        raise MissingPathError(f"--training_info {info_path}: no such file")
    if metrics_path.is_file():
        document = _read_json(metrics_path, "--metrics")
        # Either layout, checked before the Hub is asked for the account name: the error names the file.
        card_inputs(document, metrics_path)
        overrides = _read_json(info_path, "--training_info") if info_path.is_file() else {}
        # The card's loading code names the repo: a bare NAME becomes the USER/NAME create_repo will make.
        if "/" not in repo_id.strip("/"):
            repo_id = f"{hub_user(token, endpoint)}/{repo_id.strip('/')}"
        overrides["repo_id"] = repo_id  # the repo pushed to, whatever an older training_info.json says
        overrides.setdefault("model_name", repo_id.split("/")[-1])
        write_run_card(folder, document, overrides, template_path)
    elif not (folder / "README.md").is_file():
        raise FileNotFoundError(
            f"{folder} has no README.md and no {METRICS_FILENAME}: evaluate the checkpoint first "
            f"(scripts/evaluate.py --output {folder / METRICS_FILENAME}) so that a model card can be written"
        )
    return push_checkpoint(
        folder, repo_id, private=private, token=token, commit_message=commit_message, endpoint=endpoint
    )
