"""`python -m gateway` is the `llm-gateway` command."""

import sys

from .cli import main

sys.exit(main())
