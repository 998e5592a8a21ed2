"""``python -m benchmarks.segment``: thin entry point; the code is :mod:`lesionserve.benchmarks.segment`."""
from lesionserve.benchmarks.segment import main

if __name__ == "__main__":
    raise SystemExit(main())
