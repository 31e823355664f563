"""The names `lmtune serve` answers to, and the folders they stand for.

Each served root is a run, a model or adapter folder (served under its folder name, a run's checkpoints as
`NAME/checkpoint-N`), the built-in model, or a plain folder whose runs, models and adapters are served
under their paths relative to it. Names are read from disk on every request, so the checkpoints of a
run that is still training appear as they are completed; a name never leads outside its root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lmtune.chat import Target, resolve_target
from lmtune.checkpoint import CheckpointIndex
from lmtune.config import BUILTIN_MODEL
from lmtune.errors import UserError

SKIPPED = {"node_modules", "__pycache__", "site-packages", "venv"}
SEARCH_DEPTH = 3


class UnknownModel(LookupError):
    """A name the server does not serve."""


def holds_model(folder: Path) -> bool:
    """A model that writes: a reward model (stage rm) only scores, and is not served."""
    from lmtune.models import is_reward_model

    has_weights = any((folder / name).is_file() for name in ("config.json", "adapter_config.json"))
    return has_weights and not is_reward_model(folder)


def is_run(folder: Path) -> bool:
    return (folder / "run_config.yaml").is_file()


@dataclass(frozen=True)
class Root:
    name: str  # "" for a plain folder: its contents are served under their relative paths
    path: Path


class Catalog:
    def __init__(self, given: list[str]) -> None:
        self.builtin = BUILTIN_MODEL in given
        self.roots: list[Root] = []
        for text in (g for g in given if g != BUILTIN_MODEL):
            path = Path(text).expanduser().resolve()
            if not path.is_dir():
                raise UserError(f"{text} is not a folder: lmtune serve takes run folders, model or adapter "
                                f"folders, folders that hold them, or '{BUILTIN_MODEL}'")
            served_whole = is_run(path) or holds_model(path)
            self.roots.append(Root(path.name if served_whole else "", path))
        names = [root.name for root in self.roots if root.name]
        doubled = sorted({name for name in names if names.count(name) > 1})
        if doubled:
            raise UserError(f"two served folders are both named {doubled[0]}: serve their parent folder instead")

    def names(self) -> list[str]:
        """Every name that can be served now, in a stable order."""
        found = [BUILTIN_MODEL] if self.builtin else []
        for root in self.roots:
            if root.name:
                found += _names_of(root.path, root.name)
            else:
                for folder in _folders(root.path):
                    found += _names_of(folder, folder.relative_to(root.path).as_posix())
        return found

    def resolve(self, name: str) -> Target:
        """The target a name stands for; UnknownModel for anything else, and for every name that would
        lead outside the served roots."""
        if self.builtin and name == BUILTIN_MODEL:
            return resolve_target(BUILTIN_MODEL)
        folder = self._folder_of(name)
        if folder is None or not holds_model(folder):
            raise UnknownModel(name)
        try:
            return resolve_target(str(folder))
        except UserError as error:
            raise UnknownModel(f"{name}: {error}") from None

    def _folder_of(self, name: str) -> Path | None:
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or any(p in ("..", ".", "") for p in parts):
            return None
        for root in self.roots:
            if root.name:
                if parts[0] != root.name:
                    continue
                candidate = root.path.joinpath(*parts[1:])
            else:
                candidate = root.path.joinpath(*parts)
            resolved = candidate.resolve()
            if resolved != root.path and root.path not in resolved.parents:
                continue  # a link that leads out
            if resolved.is_dir():
                return resolved
        return None


def _names_of(folder: Path, name: str) -> list[str]:
    """A run's final model (once written) and its complete checkpoints, oldest first; or a model's name."""
    if not is_run(folder):
        return [name] if holds_model(folder) else []
    names = [name] if holds_model(folder) else []
    checkpoints = reversed(CheckpointIndex.load(folder).complete_newest_first())
    return names + [f"{name}/{checkpoint.name}" for checkpoint in checkpoints if holds_model(checkpoint)]


def _folders(root: Path):
    """Runs and model folders under a plain root, breadth first, not looking inside them."""
    level = [root]
    for _ in range(SEARCH_DEPTH):
        following = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
            except OSError:
                continue
            for child in children:
                if child.name.startswith(".") or child.name in SKIPPED:
                    continue
                if is_run(child) or holds_model(child):
                    yield child
                else:
                    following.append(child)
        level = following
