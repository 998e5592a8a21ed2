"""``python -m benchmarks.detect``: thin entry point; the code is :mod:`lesionserve.benchmarks.detect`."""
from lesionserve.benchmarks.detect import main

if __name__ == "__main__":
    raise SystemExit(main())
