"""`python -m jaxinfer.bench ...`: the bench subcommand without the top-level CLI."""

import sys

from .command import main

sys.exit(main())
