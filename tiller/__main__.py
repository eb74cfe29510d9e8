"""`python -m tiller`: the `tiller` command."""

import sys

from .cli import main

sys.exit(main())
