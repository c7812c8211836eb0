"""``python -m torch_rlds.bench``: the same as ``torch-rlds bench``."""

import sys

from torch_rlds.bench._main import main

sys.exit(main())
