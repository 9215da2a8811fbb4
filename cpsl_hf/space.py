"""A live demo beside the model: write (and push) a Gradio Space that segments uploaded images.

:func:`write_space` writes the Space folder: ``app.py`` (shipped in ``cpsl_hf/space_app/``; it loads the model with
``trust_remote_code``, so the Space needs no ``cpsl-hf`` install), ``space_config.json`` (the model, its class
colours, title), ``requirements.txt``, a ``README.md`` whose YAML header is the Space's configuration (``sdk:
gradio``, ``app_file``, ``models``), and ``examples/`` (images to try). :func:`push_space` creates the Space repo
and uploads the folder. ``scripts/make_space.py`` runs both.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from cpsl_hf.data.registry import is_hub_repo_id
from cpsl_hf.utils import MissingPathError, UsageError

APP_SOURCE = Path(__file__).resolve().parent / "space_app" / "app.py"

#: Image files ``--examples`` may name, or that are taken from a folder.
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: At most this many examples are copied into the Space.
MAX_EXAMPLES = 8

#: The Space's extra packages (Gradio itself comes from ``sdk_version`` in its README).
SPACE_REQUIREMENTS = ("torch", "transformers", "numpy", "pillow", "safetensors")


def class_palette(
    class_names: Sequence[str], class_table: str | os.PathLike | None = None
) -> list[list[int]]:
    """One RGB colour per class: the class table's palette when one is given (its names must be the model's, in
    order), else the Cityscapes colour of every Cityscapes class name and distinct colours
    (:func:`cpsl_hf.data.class_table.distinct_palette`) for the others."""
    from cpsl_hf.data.class_table import distinct_palette, load_class_table
    from cpsl_hf.data.protocols import CITYSCAPES_PALETTE
    from cpsl_hf.data.protocols import class_names as cityscapes_names

    if class_table is not None:
        table = load_class_table(class_table)
        if list(table.names) != list(class_names):
            raise UsageError(
                f"--class_table {class_table}: its classes {list(table.names)} are not the model's "
                f"{list(class_names)}"
            )
        return table.palette.tolist()
    cityscapes = dict(zip(cityscapes_names(19), CITYSCAPES_PALETTE.tolist()))
    others = distinct_palette(len(class_names)).tolist()
    return [cityscapes.get(name, others[index]) for index, name in enumerate(class_names)]


def _model_config(model: str) -> dict:
    """The model's ``config.json`` (a local folder, or fetched from the Hub)."""
    if os.path.isdir(model):
        path = Path(model) / "config.json"
        if not path.is_file():
            raise MissingPathError(f"--model {model}: has no config.json, so it is not a model folder")
    elif is_hub_repo_id(model):
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model, "config.json"))
        except Exception as error:  # offline, missing repo, no access: one line that says which
            raise UsageError(
                f"--model {model}: cannot read its config.json from the Hub ({error})"
            ) from error
    else:
        raise UsageError(f"--model {model!r}: neither a local model folder nor a Hub repo id USER/NAME")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--model {model}: cannot read {path} as JSON ({error})") from error


def _example_files(examples: Sequence[str | os.PathLike] | None, model: str) -> list[Path]:
    """The images to offer: ``examples`` (files, or folders whose images are taken), else the model folder's
    ``examples/`` (written by the trainer with ``--save_predictions``)."""
    if not examples:
        default = Path(model) / "examples"
        return sorted(p for p in default.glob("*") if p.suffix.lower() in EXAMPLE_SUFFIXES)[:MAX_EXAMPLES]
    files: list[Path] = []
    for entry in examples:
        path = Path(entry)
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*") if p.suffix.lower() in EXAMPLE_SUFFIXES))
        elif path.is_file():
            if path.suffix.lower() not in EXAMPLE_SUFFIXES:
                raise UsageError(f"--examples {path}: not an image ({', '.join(EXAMPLE_SUFFIXES)})")
            files.append(path)
        else:
            raise MissingPathError(f"--examples {path}: no such file or folder")
    return files[:MAX_EXAMPLES]


def _space_readme(space_id: str, model: str, title: str, gradio_version: str, hub_model: bool) -> str:
    import yaml

    header = {
        "title": title[:60],
        "emoji": "🚗",
        "colorFrom": "indigo",
        "colorTo": "red",
        "sdk": "gradio",
        "sdk_version": gradio_version,
        "app_file": "app.py",
        "pinned": False,
        "license": "apache-2.0",
        "short_description": "Semantic segmentation adapted with CPSL (CVPR 2022)"[:60],
    }
    if hub_model:
        header["models"] = [model]
    shown = f"[`{model}`](https://huggingface.co/{model})" if hub_model else "a local model folder"
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n\n# {title}\n\n"
        f"Upload a street photo or pick an example: the app shows what {shown} sees in it, a colour mask and an "
        "overlay side by side, with a legend of the classes present. The model was adapted from synthetic renders "
        "to real photos with CPSL (class-balanced pixel-level self-labeling, Li et al., CVPR 2022) using the "
        "`cpsl-hf` package; its modelling code loads with `trust_remote_code`.\n\n"
        "Run it locally: `pip install gradio -r requirements.txt && python app.py`.\n"
    )


def write_space(
    model: str,
    space_id: str,
    output_dir: str | os.PathLike,
    examples: Sequence[str | os.PathLike] | None = None,
    title: str | None = None,
    class_table: str | os.PathLike | None = None,
) -> Path:
    """Write the Space folder for ``model`` into ``output_dir`` and return it.

    Args:
        model: the model's Hub repo id (what a pushed Space loads) or a local model folder (for ``python app.py``
            on this machine; such a Space cannot be pushed).
        space_id: ``USER/NAME`` of the Space (named in its README and title).
        output_dir: the folder to write (created; files of the same names are replaced).
        examples: image files or folders to offer as examples (default: the model folder's ``examples/``).
        title: the page's title (default: from the model's name).
        class_table: the class table the model was trained with (``--class_table``): its palette colours the
            masks (default: Cityscapes colours by class name, distinct colours for other names).
    """
    import transformers

    try:
        import gradio
    except ImportError as error:
        raise UsageError(
            "scripts/make_space.py needs Gradio, which is not installed: pip install 'cpsl-hf[demo]'"
        ) from error
    if not is_hub_repo_id(space_id):
        raise UsageError(f"--space_id {space_id!r}: must be USER/NAME")
    config = _model_config(model)
    id2label = config.get("id2label") or {}
    names = [id2label[key] for key in sorted(id2label, key=int)]
    if not names:
        raise UsageError(f"--model {model}: its config.json has no id2label, so the app cannot name classes")
    hub_model = not os.path.isdir(model)
    title = title or f"{(model.rstrip('/').split('/')[-1])} (CPSL segmentation)"
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(APP_SOURCE, folder / "app.py")
    settings = {
        "model": model if hub_model else str(Path(model).resolve()),
        "title": title,
        "description": f"{len(names)} classes: " + ", ".join(names) + ".",
        "palette": class_palette(names, class_table),
    }
    (folder / "space_config.json").write_text(json.dumps(settings, indent=1, ensure_ascii=False) + "\n")
    requirements = [f"transformers=={transformers.__version__}"] + [
        name for name in SPACE_REQUIREMENTS if name != "transformers"
    ]
    (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (folder / "README.md").write_text(
        _space_readme(space_id, model, title, gradio.__version__, hub_model), encoding="utf-8"
    )
    example_dir = folder / "examples"
    if example_dir.exists():
        shutil.rmtree(example_dir)
    chosen = _example_files(examples, model)
    if chosen:
        example_dir.mkdir()
        used: set[str] = set()
        for index, path in enumerate(chosen):  # names kept; an index only where two would collide
            name = path.name if path.name not in used else f"{index:02d}_{path.name}"
            used.add(name)
            shutil.copyfile(path, example_dir / name)
    return folder


def push_space(
    folder: str | os.PathLike,
    space_id: str,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create the Gradio Space ``space_id`` (if needed) and upload ``folder`` (written by :func:`write_space` for a
    Hub model); returns the Space's URL. The same fast checks as a model push come first
    (:func:`cpsl_hf.hub.check_hub_access`)."""
    from huggingface_hub import HfApi

    from cpsl_hf.hub import check_hub_access

    folder = Path(folder)
    settings_path = folder / "space_config.json"
    if not settings_path.is_file():
        raise MissingPathError(f"{folder}: has no space_config.json (write it with write_space first)")
    model = json.loads(settings_path.read_text(encoding="utf-8"))["model"]
    if os.path.isabs(model) or not is_hub_repo_id(model):
        raise UsageError(
            f"--push: the Space would load the local folder {Path(model).name!r}, which does not exist on the Hub; "
            "push the model first (scripts/push_to_hub.py) and pass its repo id as --model"
        )
    token = check_hub_access(token, endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=folder, repo_id=url.repo_id, repo_type="space", commit_message=f"Demo of {model}"
    )
    return str(url)


__all__ = ["class_palette", "push_space", "write_space"]
