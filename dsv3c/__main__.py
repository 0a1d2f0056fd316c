"""`python -m dsv3c`: the same as the `dsv3c` command."""

import sys

from .cli import main

sys.exit(main())
