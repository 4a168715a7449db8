"""`python -m cli ...` is `captioner ...` (what torchrun runs: `torchrun ... -m cli train ...`)."""

import sys

from cli import main

sys.exit(main())
