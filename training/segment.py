"""``python -m training.segment``: thin entry point; the code is :mod:`lesionserve.segmentation.train`."""
from lesionserve.segmentation.train import main

if __name__ == "__main__":
    raise SystemExit(main())
