"""``python -m streamproc.testing tiny-model DIR``: see :mod:`streamproc.testing.tiny_model`."""

import sys

from .tiny_model import main

sys.exit(main())
