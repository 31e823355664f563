"""lmtune: fine-tune causal language models from one YAML file."""

import os

# Before torch loads OpenMP: its threads sleep at a barrier rather than spin. On a CPU shared with other
# processes a spinning thread holds the core its partner needs; a SmolLM2 step took 120 s instead of 11 s
# at a load average of 12 on 2 cores (bench/README.md, "step"). OMP_WAIT_POLICY set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
