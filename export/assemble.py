"""``python -m export.assemble``: thin entry point; the code is :mod:`lesionserve.export.assemble`."""
from lesionserve.export.assemble import main

if __name__ == "__main__":
    raise SystemExit(main())
