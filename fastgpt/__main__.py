"""`python -m fastgpt ...` is the `fastgpt` command."""
import sys

from .cli import main

sys.exit(main())
