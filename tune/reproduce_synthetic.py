"""``freetf reproduce``: the paper's synthetic experiment (§4.1, Figure 4) as a measured
table.  This script is an alias of the command, for a checkout:

    python tune/reproduce_synthetic.py             # Tune grid over kappa in {1/64, 1/8, 1, 8} bits
    python tune/reproduce_synthetic.py --smoke     # a minute: the pipeline, not the result
    python tune/reproduce_synthetic.py --resume    # continue an interrupted run
    python tune/reproduce_synthetic.py --in-process --device cuda --config synthetic

Writes reports/<sweep name>/synthetic_reproduction.{md,png,json} (--out docs: the committed
docs/synthetic_reproduction.*).  The command is :mod:`freetf.commands.reproduce`, the logic
:mod:`freetf.experiments.reproduce`.
"""

import sys

from freetf.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
