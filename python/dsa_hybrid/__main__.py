"""`python -m dsa_hybrid ...` runs the `dsa-hybrid` command line."""

import sys

from dsa_hybrid.cli import main

sys.exit(main())
