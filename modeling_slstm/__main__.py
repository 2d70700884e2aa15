"""`python -m modeling_slstm ...` is the `slstm` command line."""

import sys

from .cli import main


sys.exit(main())
