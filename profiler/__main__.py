"""Entry point of ``python -m profiler``; see ``profiler.cli``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(end_like_python=True))
