"""``python -m benchmarks.tuning``: thin entry point; the code is :mod:`lesionserve.benchmarks.tuning`."""
from lesionserve.benchmarks.tuning import main

if __name__ == "__main__":
    raise SystemExit(main())
