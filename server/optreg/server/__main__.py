import sys

from optreg.server.cli import main

sys.exit(main())
