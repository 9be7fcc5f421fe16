"""``python -m slimops``: the command line (``slimops.apps.cli``)."""

import sys

from slimops.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
