"""``python -m training.evaluate``: thin entry point; the code is :mod:`lesionserve.training.evaluate`."""
from lesionserve.training.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
