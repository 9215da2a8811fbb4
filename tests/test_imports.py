"""What ``import cpsl_hf`` costs and still does, each in a fresh process.

``cpsl_hf``, ``cpsl_hf.data`` and ``cpsl_hf.selflabel`` import neither transformers nor accelerate (nor
datasets); the CPSL classes are still registered with the Auto classes, whichever of transformers and cpsl_hf
is imported first (``cpsl_hf._autoregister``).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cpsl_hf

REPOSITORY_ROOT = str(Path(cpsl_hf.__file__).resolve().parents[1])
HEAVY = ("transformers", "accelerate", "datasets")


def run_fresh(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPOSITORY_ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", textwrap.dedent(script)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_ok(completed: subprocess.CompletedProcess) -> None:
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().endswith("OK"), completed.stdout[-3000:]


def test_selflabel_needs_only_torch(tmp_path):
    """``import cpsl_hf.selflabel`` (and ``cpsl_hf``, ``cpsl_hf.data``), a SelfLabeling step: torch only."""
    completed = run_fresh(
        f"""
        import sys
        import cpsl_hf, cpsl_hf.data
        import torch
        from cpsl_hf.selflabel import SelfLabeling

        generator = torch.Generator().manual_seed(0)
        module = SelfLabeling(num_classes=4, embedding_dim=6, num_samples=5, bank_size=12)
        z = torch.randn(2, 6, 3, 4, generator=generator)
        p_st = torch.softmax(torch.randn(2, 4, 3, 4, generator=generator), dim=1)
        prototypes = torch.randn(4, 6, generator=generator)
        out = module(z, p_st, prototypes, torch.nn.Parameter(prototypes.clone()), generator=generator)
        out.loss.backward()
        assert out.labels.shape == (2, 3, 4) and torch.isfinite(out.loss), out
        loaded = [name for name in {HEAVY!r} if name in sys.modules]
        assert not loaded, f"imported: {{loaded}}"
        print("OK")
        """,
        tmp_path,
    )
    assert_ok(completed)


def test_import_cpsl_hf_then_transformers_registers(tmp_path):
    """``import cpsl_hf``, then transformers: the Auto classes know CPSL before a cpsl_hf model name is used,
    and a saved checkpoint loads back as the package's class without ``trust_remote_code``."""
    completed = run_fresh(
        """
        import sys
        import cpsl_hf
        assert "transformers" not in sys.modules

        from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation

        # Before touching cpsl_hf.CPSLConfig (whose access registers too): the import hook did it.
        config = AutoConfig.for_model("cpsl", num_labels=19)
        assert type(config).__module__ == "cpsl_hf.configuration_cpsl", type(config)
        assert not any(type(finder).__module__ == "cpsl_hf._autoregister" for finder in sys.meta_path)
        assert "exec_module" not in vars(sys.modules["transformers"].__spec__.loader)

        model = cpsl_hf.CPSLForSemanticSegmentation(cpsl_hf.CPSLConfig.from_preset("segformer-tiny"))
        model.save_pretrained("tiny")
        for auto_class in (AutoModel, AutoModelForSemanticSegmentation):
            loaded = auto_class.from_pretrained("tiny")
            assert type(loaded) is cpsl_hf.CPSLForSemanticSegmentation, type(loaded)
        print("OK")
        """,
        tmp_path,
    )
    assert_ok(completed)


@pytest.mark.parametrize(
    "first",
    [
        "import transformers",
        "import cpsl_hf.modeling_cpsl",
        "from cpsl_hf.configuration_cpsl import CPSLConfig",
    ],
)
def test_registered_whatever_is_imported_first(tmp_path, first):
    """transformers before cpsl_hf (registered at ``import cpsl_hf``), or imported by the model modules
    themselves (registered once the outermost has finished)."""
    completed = run_fresh(
        f"""
        import sys
        {first}
        import cpsl_hf

        assert "cpsl_hf.modeling_cpsl" in sys.modules, "not registered"
        from transformers import AutoConfig
        from transformers.models.auto import modeling_auto
        from cpsl_hf.configuration_cpsl import CPSLConfig
        from cpsl_hf.modeling_cpsl import CPSLForSemanticSegmentation

        assert type(AutoConfig.for_model("cpsl")) is CPSLConfig
        assert modeling_auto.MODEL_MAPPING[CPSLConfig] is CPSLForSemanticSegmentation
        segmentation_mapping = modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING
        assert segmentation_mapping[CPSLConfig] is CPSLForSemanticSegmentation
        print("OK")
        """,
        tmp_path,
    )
    assert_ok(completed)


def test_registration_errors_surface(tmp_path):
    """A registration that fails raises from ``import transformers`` and from the attribute, with a note."""
    completed = run_fresh(
        """
        import sys
        import cpsl_hf
        sys.modules["cpsl_hf.modeling_cpsl"] = None  # its import now raises ImportError
        for attempt in ("import transformers", "cpsl_hf.CPSLConfig"):
            try:
                exec(attempt)
            except ImportError as error:
                assert "cpsl_hf.modeling_cpsl" in str(error), error
                assert any("cpsl_hf registered" in note for note in getattr(error, "__notes__", [])), error
            else:
                raise AssertionError(f"{attempt}: no error")
        print("OK")
        """,
        tmp_path,
    )
    assert_ok(completed)


def test_public_names():
    assert cpsl_hf.__version__
    assert set(cpsl_hf.__all__) <= set(dir(cpsl_hf))
    for name in cpsl_hf.__all__:
        assert getattr(cpsl_hf, name) is not None
    with pytest.raises(AttributeError):
        cpsl_hf.not_a_name  # noqa: B018
