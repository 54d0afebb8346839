"""``python -m simcal`` (and ``torchrun --nproc_per_node N -m simcal train ...``)."""

import sys

from simcal.cli import main

sys.exit(main())
