"""``python -m torch_rlds``: the ``torch-rlds`` command."""

import sys

from torch_rlds.cli import main

sys.exit(main())
