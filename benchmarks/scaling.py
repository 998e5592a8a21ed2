"""``python -m benchmarks.scaling``: thin entry point; the code is :mod:`lesionserve.benchmarks.scaling`."""
from lesionserve.benchmarks.scaling import main

if __name__ == "__main__":
    raise SystemExit(main())
