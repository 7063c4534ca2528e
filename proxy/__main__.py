"""`python -m proxy` is `vcache`."""

import sys

from proxy.cli.main import main

sys.exit(main())
