import sys

from optreg.app.cli import main

sys.exit(main())
