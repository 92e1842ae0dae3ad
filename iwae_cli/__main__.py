"""`python -m iwae_cli` is the `iwae` command."""

import sys

from iwae_cli import main

sys.exit(main())
