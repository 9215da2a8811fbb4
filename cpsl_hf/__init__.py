"""cpsl-hf: CPSL (Class-Balanced Pixel-Level Self-Labeling) for domain adaptive semantic segmentation.

``import cpsl_hf`` imports neither transformers nor accelerate, so the plain-torch parts
(``cpsl_hf.selflabel``, ``cpsl_hf.data``) start fast. :class:`CPSLConfig` is still registered with
``AutoConfig`` and :class:`CPSLForSemanticSegmentation` with ``AutoModel`` and
``AutoModelForSemanticSegmentation``: at once if transformers is already imported, otherwise right after
transformers is imported, or when a model name below is first used (see :mod:`cpsl_hf._autoregister`).
The model names are resolved on first use (PEP 562); sub-packages (``cpsl_hf.selflabel``, ``cpsl_hf.data``,
``cpsl_hf.training``) are imported on first use.
"""

from cpsl_hf import _autoregister
from cpsl_hf._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": "configuration_cpsl",
    "CPSLConfig": "configuration_cpsl",
    "CPSLForSemanticSegmentation": "modeling_cpsl",
    "CPSLSemanticSegmenterOutput": "modeling_cpsl",
}

__all__ = [*_EXPORTS, "__version__"]

_lazy_getattr = lazy_getattr(__name__, _EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        _autoregister.register()
    return _lazy_getattr(name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


# MODEL-REGISTRATION (owned by the model code): the Auto classes, now or once transformers is imported.
_autoregister.install()
