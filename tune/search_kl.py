"""``freetf sweep``: sweep kl_weight, free bits and their schedules with Ray Tune; draw the
collapse map.  This script is an alias of the command, for a checkout:

    python tune/search_kl.py          # the default sweep (freetf/configs/search_kl.yaml)
    python tune/search_kl.py --smoke  # one minute (freetf/configs/search_kl_smoke.yaml)
    python tune/search_kl.py --set training.max_steps=100 --set search.seed=1
    python tune/search_kl.py --resume # continue an interrupted sweep

The command is :mod:`freetf.commands.sweep`, the logic :mod:`freetf.sweeps`; see
docs/sweeps.md.
"""

import sys

from freetf.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
