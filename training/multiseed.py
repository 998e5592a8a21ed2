"""``python -m training.multiseed``: thin entry point; the code is :mod:`lesionserve.training.multiseed`."""
from lesionserve.training.multiseed import main

if __name__ == "__main__":
    raise SystemExit(main())
