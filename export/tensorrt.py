"""``python -m export.tensorrt``: thin entry point; the code is :mod:`lesionserve.export.tensorrt`."""
from lesionserve.export.tensorrt import main

if __name__ == "__main__":
    raise SystemExit(main())
