"""Reproduce the paper's synthetic experiment (§4.1, Figure 4) as a measured table.

    python tune/reproduce_synthetic.py             # Tune grid over kappa in {1/64, 1/8, 1, 8} bits
    python tune/reproduce_synthetic.py --smoke     # a minute: the pipeline, not the result
    python tune/reproduce_synthetic.py --resume    # continue an interrupted run
    python tune/reproduce_synthetic.py --in-process --device cuda \
        --config freetf/configs/synthetic.yaml

Writes reports/<sweep name>/synthetic_reproduction.{md,png,json} (--out docs: the committed
docs/synthetic_reproduction.*); the logic lives in freetf.experiments.reproduce.
"""

import sys
from pathlib import Path

from freetf.commands.reproduce import main

CONFIGS = Path(__file__).resolve().parent.parent / "freetf" / "configs"

if __name__ == "__main__":
    sys.exit(main(default_spec=CONFIGS / "reproduce_synthetic.yaml",
                  smoke_spec=CONFIGS / "reproduce_synthetic_smoke.yaml"))
