"""`python -m mmlm` is the `mmlm` command."""

import sys

from mmlm.cli import main

sys.exit(main())
