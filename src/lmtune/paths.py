"""Where lmtune keeps what it can rebuild: converted models and processed data."""

import os
from pathlib import Path


def cache_home() -> Path:
    """`LMTUNE_HOME`, or `~/.cache/lmtune`."""
    root = os.environ.get("LMTUNE_HOME") or Path.home() / ".cache" / "lmtune"
    return Path(root)
