"""cpsl-hf: CPSL (Class-Balanced Pixel-Level Self-Labeling) for domain adaptive semantic segmentation.

Importing the package registers :class:`CPSLConfig` with ``AutoConfig`` and
:class:`CPSLForSemanticSegmentation` with ``AutoModel`` and ``AutoModelForSemanticSegmentation``.
Sub-packages (``cpsl_hf.selflabel``, ``cpsl_hf.data``, ``cpsl_hf.training``) are imported on first use.
"""

__version__ = "0.1.0"

# MODEL-REGISTRATION (owned by the model code): the imports below register the Auto classes.
from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation  # noqa: E402

from .configuration_cpsl import PRESETS, CPSLConfig  # noqa: E402
from .modeling_cpsl import CPSLForSemanticSegmentation, CPSLSemanticSegmenterOutput  # noqa: E402

AutoConfig.register(CPSLConfig.model_type, CPSLConfig, exist_ok=True)
AutoModel.register(CPSLConfig, CPSLForSemanticSegmentation, exist_ok=True)
AutoModelForSemanticSegmentation.register(CPSLConfig, CPSLForSemanticSegmentation, exist_ok=True)

__all__ = [
    "PRESETS",
    "CPSLConfig",
    "CPSLForSemanticSegmentation",
    "CPSLSemanticSegmenterOutput",
    "__version__",
]
