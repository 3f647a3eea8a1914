"""The baseline against the Free Transformer at kappa in {1/8, ..., 4} bits on real code.

    python tune/compare_code.py                # 21 trials (3 baselines + 6 kappas x 3 seeds)
    python tune/compare_code.py --smoke        # the pipeline in a few minutes, not the result
    python tune/compare_code.py --resume       # continue an interrupted run
    python tune/compare_code.py --report-only  # the table and figure again, from MLflow

Prepares Python's standard library into data/stdlib-bpe4k first if it is missing.  Writes
reports/compare_code/compare.{md,csv,json,png}, also logged to the sweep's MLflow parent
run; the logic lives in freetf.experiments.compare.
"""

import sys
from pathlib import Path

from freetf.commands.compare import main

CONFIGS = Path(__file__).resolve().parent.parent / "freetf" / "configs"

if __name__ == "__main__":
    sys.exit(main(default_spec=CONFIGS / "compare_code.yaml",
                  smoke_spec=CONFIGS / "compare_code_smoke.yaml"))
