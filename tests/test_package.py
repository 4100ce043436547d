import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_root_init_imports_without_comfyui():
    assert "comfy" not in sys.modules
    spec = importlib.util.spec_from_file_location("concept_erasure_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
    assert all(k.startswith("ConceptErasure") for k in module.NODE_CLASS_MAPPINGS)
