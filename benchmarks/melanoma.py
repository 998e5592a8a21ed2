"""``python -m benchmarks.melanoma``: thin entry point; the code is :mod:`lesionserve.benchmarks.melanoma`."""
from lesionserve.benchmarks.melanoma import main

if __name__ == "__main__":
    raise SystemExit(main())
