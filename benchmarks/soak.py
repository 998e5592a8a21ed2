"""``python -m benchmarks.soak``: thin entry point; the code is :mod:`lesionserve.benchmarks.soak`."""
from lesionserve.benchmarks.soak import main

if __name__ == "__main__":
    raise SystemExit(main())
