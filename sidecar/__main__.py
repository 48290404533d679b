"""`python -m sidecar` runs the command line."""

import sys

from sidecar.cli import main

sys.exit(main())
