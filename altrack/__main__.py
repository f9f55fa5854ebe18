import sys

from altrack.cli import main

sys.exit(main())
