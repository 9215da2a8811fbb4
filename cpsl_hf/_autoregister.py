"""Register the CPSL classes with the Auto classes, yet keep transformers out of ``import cpsl_hf``.

Why: ``cpsl_hf.selflabel`` (and ``cpsl_hf.data``) need only torch; importing transformers (and, through it,
accelerate) at ``import cpsl_hf`` cost seconds to every user of the plain-torch parts. Yet ``import cpsl_hf``
followed by ``AutoModel.from_pretrained(folder)`` (no ``trust_remote_code``) must find the CPSL classes.

How: :func:`install` registers at once if transformers is already imported; otherwise it puts
:class:`_RegisterAfterImport` first on ``sys.meta_path``. That finder only watches ``transformers`` (the top
level package) and the two model modules: it lets the other finders find them and wraps the loader's
``exec_module`` so that :func:`register` runs right after the module's body, i.e. right after
``transformers/__init__.py`` has run (transformers' own ``_LazyModule`` is in ``sys.modules`` by then), or,
when transformers was first imported by ``configuration_cpsl`` / ``modeling_cpsl`` themselves, right after
the outermost of those has finished (registering earlier would import a half-initialised module).
:func:`register` removes the finder, so it acts once. ``cpsl_hf.CPSLConfig`` and the other model names also
call :func:`register` (``cpsl_hf.__getattr__``).

Cost: once cpsl_hf is imported, importing anything from transformers (even ``HfArgumentParser``) also imports
the model modules and so ``transformers.modeling_utils`` (and accelerate). Watching
``transformers.models.auto.*`` instead would defer that, but those modules are imported half-way through
``transformers.modeling_utils`` (``quantizers/auto.py``, ``modeling_layers.py``), where registering would
import ``PreTrainedModel`` from a half-initialised module.

Errors are not swallowed: if registration raises, the exception surfaces from the import of transformers (or
from the attribute access) with a note saying it came from here. The two model modules stay free of this
(they travel with checkpoints as remote code and import only transformers and torch).
"""

from __future__ import annotations

import importlib
import sys
from importlib.abc import MetaPathFinder

_MODEL_MODULES = frozenset({"cpsl_hf.configuration_cpsl", "cpsl_hf.modeling_cpsl"})
_WATCHED = _MODEL_MODULES | {"transformers"}
_executing: set[str] = set()  # watched modules whose body is running now
_registered = False
_WHILE = "cpsl_hf registered CPSLConfig / CPSLForSemanticSegmentation with transformers' Auto classes"


def register() -> None:
    """Register ``CPSLConfig`` with ``AutoConfig`` and ``CPSLForSemanticSegmentation`` with ``AutoModel`` and
    ``AutoModelForSemanticSegmentation`` (idempotent; imports transformers and the model modules)."""
    global _registered
    if _registered:
        return
    _uninstall()
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation

        configuration = importlib.import_module("cpsl_hf.configuration_cpsl")
        modeling = importlib.import_module("cpsl_hf.modeling_cpsl")
        config_class, model_class = configuration.CPSLConfig, modeling.CPSLForSemanticSegmentation
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForSemanticSegmentation.register(config_class, model_class, exist_ok=True)
    except AttributeError as error:  # else it would pass for a missing name (hasattr, ``from ... import``)
        raise RuntimeError(f"cpsl_hf: {_WHILE}: {error}") from error
    except BaseException as error:
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(f"(raised while {_WHILE})")
        raise
    _registered = True


def install() -> None:
    """Register now if transformers is imported, else as soon as it is (see the module docstring)."""
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterImport)]


class _RegisterAfterImport(MetaPathFinder):
    """Finds nothing itself: wraps ``exec_module`` of the spec the other finders return for a watched name."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):
            _executing.add(fullname)
            try:
                exec_module(module)
            finally:
                _executing.discard(fullname)
                del loader.exec_module  # the loader's own method again
            if "transformers" in sys.modules and not _executing & _MODEL_MODULES:
                register()

        loader.exec_module = exec_then_register
        return spec
