"""``python -m benchmarks.crop``: thin entry point; the code is :mod:`lesionserve.benchmarks.crop`."""
from lesionserve.benchmarks.crop import main

if __name__ == "__main__":
    raise SystemExit(main())
