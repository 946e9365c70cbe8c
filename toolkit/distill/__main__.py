"""``python -m toolkit.distill`` (and ``torchrun ... -m toolkit.distill``)."""

import sys

from toolkit.distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
