"""``python -m benchmarks.replicas``: thin entry point; the code is :mod:`lesionserve.benchmarks.replicas`."""
from lesionserve.benchmarks.replicas import main

if __name__ == "__main__":
    raise SystemExit(main())
