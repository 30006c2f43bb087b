"""`python -m optreg.server serve ...`: the server alone, without the application layer (cli.py)."""
import sys

from optreg.server.cli import main

sys.exit(main())
