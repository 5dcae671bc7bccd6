"""`python -m fedpeft.cli`: the same command as `fedpeft`."""

import sys

from fedpeft.cli import main

sys.exit(main())
