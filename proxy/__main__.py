"""`python -m proxy` is `vcache`."""

import sys

from proxy.cli import main

sys.exit(main())
