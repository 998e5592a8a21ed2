"""``python -m training.splits``: thin entry point; the code is :mod:`lesionserve.training.splits`."""
from lesionserve.training.splits import main

if __name__ == "__main__":
    raise SystemExit(main())
