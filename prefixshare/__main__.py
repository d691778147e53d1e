"""``python -m prefixshare``: the same command line as the ``prefixshare`` script."""

from .tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
