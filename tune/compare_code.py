"""``freetf compare``: the baseline against the Free Transformer at kappa in {1/8, ..., 4}
bits on real code.  This script is an alias of the command, for a checkout:

    python tune/compare_code.py                # 21 trials (3 baselines + 6 kappas x 3 seeds)
    python tune/compare_code.py --smoke        # the pipeline in a few minutes, not the result
    python tune/compare_code.py --resume       # continue an interrupted run
    python tune/compare_code.py --report-only  # the table and figure again, from MLflow

Prepares Python's standard library into data/stdlib-bpe4k first if it is missing.  Writes
reports/compare_code/compare.{md,csv,json,png}, also logged to the sweep's MLflow parent
run.  The command is :mod:`freetf.commands.compare`, the logic
:mod:`freetf.experiments.compare`.
"""

import sys

from freetf.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
