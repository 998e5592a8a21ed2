"""``python -m benchmarks.harness``: thin entry point; the code is :mod:`lesionserve.benchmarks.harness`."""
from lesionserve.benchmarks.harness import main

if __name__ == "__main__":
    raise SystemExit(main())
