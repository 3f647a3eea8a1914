"""Sweep kl_weight, free bits and their schedules with Ray Tune; draw the collapse map.

    python tune/search_kl.py          # the default sweep (freetf/configs/search_kl.yaml)
    python tune/search_kl.py --smoke  # one minute (freetf/configs/search_kl_smoke.yaml)
    python tune/search_kl.py --set training.max_steps=100 --set search.seed=1
    python tune/search_kl.py --resume             # continue an interrupted sweep

The logic lives in :mod:`freetf.sweeps`; see docs/sweeps.md.
"""

import sys
from pathlib import Path

from freetf.commands.sweep import main

CONFIGS = Path(__file__).resolve().parent.parent / "freetf" / "configs"

if __name__ == "__main__":
    sys.exit(main(default_config=CONFIGS / "search_kl.yaml",
                  smoke_config=CONFIGS / "search_kl_smoke.yaml"))
