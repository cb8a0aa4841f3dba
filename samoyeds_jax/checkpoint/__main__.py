"""``python -m samoyeds_jax.checkpoint``: the ``samoyeds-convert`` command line."""

import sys

from samoyeds_jax.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main())
