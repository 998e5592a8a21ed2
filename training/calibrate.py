"""``python -m training.calibrate``: thin entry point; the code is :mod:`lesionserve.training.calibrate`."""
from lesionserve.training.calibrate import main

if __name__ == "__main__":
    raise SystemExit(main())
