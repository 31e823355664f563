"""What every command's start-up pays: transformers' lazy import structure built once, with the same
result as transformers builds it alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

OLD = os.environ.get("LMTUNE_OLD_TRANSFORMERS")

LAZY_MODELS = """
import json, sys
if sys.argv[1] == "lmtune":
    import lmtune
import transformers.models as models
from transformers.utils import import_utils
print(json.dumps({"scanned": import_utils.create_import_structure_from_path.cache_info().misses,
                  "modules": sorted(models._modules), "classes": sorted(models._class_to_module.items())}))
"""


def lazy_models(first: str, transformers_dir: str | None = None) -> dict:
    env = dict(os.environ)
    if transformers_dir:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [transformers_dir, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", LAZY_MODELS, first], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("transformers_dir", [
    pytest.param(None, id="installed"),
    pytest.param(OLD, id="oldest", marks=pytest.mark.skipif(OLD is None, reason="LMTUNE_OLD_TRANSFORMERS (a folder "
                                                            "with the oldest allowed transformers) is not set")),
])
def test_transformers_models_folder_is_scanned_once_with_the_same_result(transformers_dir):
    alone, with_lmtune = lazy_models("transformers", transformers_dir), lazy_models("lmtune", transformers_dir)
    assert with_lmtune["modules"] == alone["modules"]
    assert with_lmtune["classes"] == alone["classes"]
    assert with_lmtune["scanned"] * 2 == alone["scanned"]  # each model folder read once, not twice
