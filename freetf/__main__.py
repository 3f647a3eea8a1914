import sys

from freetf.cli import main

sys.exit(main())
