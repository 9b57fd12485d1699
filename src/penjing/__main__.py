"""`python -m penjing`: the `penjing` command."""

import sys

from penjing.cli import main

sys.exit(main())
