"""``python -m benchmarks.run_batch``: thin entry point; the code is :mod:`lesionserve.benchmarks.run_batch`."""
from lesionserve.benchmarks.run_batch import main

if __name__ == "__main__":
    raise SystemExit(main())
