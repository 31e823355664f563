"""transformers' lazy import structure, built once instead of twice.

`import transformers` reads every file under `transformers/models` (about 3,000) to learn what each model
module exports; importing `transformers.models` a moment later (any model or tokenizer class does) reads
them all again, because the cache of that scan holds 128 folders and there are more than 500. That is
about half a second of every command's start-up that loads a tokenizer or a model. The second scan's
answer is the first one without the `models.` prefix of its module names: `reuse_models_scan` gives
that answer while `transformers.models` is imported. Where transformers builds its structure in another
way (another version), nothing is changed.
"""

from __future__ import annotations

import importlib.abc
import sys
from pathlib import Path
from typing import Any

PREFIX = "models."


def unprefixed_models_structure(prefixed: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """The models folder's structure as `transformers.models` asks for it, from the one `transformers` made
    (whose module names start with `models.`; it also holds transformers' own top-level modules: left out)."""
    structure = {}
    for backends, modules in prefixed.items():
        kept = {name[len(PREFIX):]: objects for name, objects in modules.items() if name.startswith(PREFIX)}
        if kept:
            structure[backends] = kept
    return structure


class ReuseModelsScan(importlib.abc.MetaPathFinder):
    """Installed once (lmtune/__init__.py): when `transformers.models` is about to be imported, its call
    for the models folder's structure gets the one `import transformers` already made."""

    done = False  # it stays in sys.meta_path: removing it while the import system walks that list would skip a finder

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "transformers.models" and not self.done:
            self.done = True
            reuse_models_scan()
        return None  # the import itself goes on as always


def reuse_models_scan() -> None:
    import_utils = sys.modules.get("transformers.utils.import_utils")
    scan = getattr(import_utils, "define_import_structure", None)
    if scan is None or not hasattr(scan, "cache_info"):
        return
    models = Path(sys.modules["transformers"].__file__).parent / "models"  # as transformers names it

    def define_import_structure(module_path: Any, prefix: str | None = None) -> Any:
        if prefix is None and Path(module_path) == models / "__init__.py":
            return unprefixed_models_structure(scan(models, prefix="models"))
        return scan(module_path, prefix)

    import_utils.define_import_structure = define_import_structure


def install() -> None:
    if "transformers.models" not in sys.modules:
        sys.meta_path.insert(0, ReuseModelsScan())
