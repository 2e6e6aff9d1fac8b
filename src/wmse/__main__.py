"""`python -m wmse ...` (what torchrun runs) is the `wmse` command."""

import sys

from .cli import main

sys.exit(main())
