"""`python -m cli ...` is `pipetwin ...` (tests and tools that run the checkout)."""
import sys

from cli.main import main

sys.exit(main())
