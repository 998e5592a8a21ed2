"""``python -m training.train``: thin entry point; the code is :mod:`lesionserve.training.train`."""
from lesionserve.training.train import main

if __name__ == "__main__":
    raise SystemExit(main())
