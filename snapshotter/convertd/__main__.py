"""`python -m snapshotter.convertd`: the same as `lazysnap convertd`."""

import sys

from snapshotter.convertd.service import main

sys.exit(main())
