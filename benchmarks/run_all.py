"""``python -m benchmarks.run_all``: thin entry point; the code is :mod:`lesionserve.benchmarks.run_all`."""
from lesionserve.benchmarks.run_all import main

if __name__ == "__main__":
    raise SystemExit(main())
