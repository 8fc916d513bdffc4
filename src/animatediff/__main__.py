"""`python -m animatediff ...`: the same as the `animatediff` command."""

import sys

from .cli.main import main

sys.exit(main())
