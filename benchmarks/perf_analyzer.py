"""``python -m benchmarks.perf_analyzer``: thin entry point; the code is :mod:`lesionserve.benchmarks.perf_analyzer`."""
from lesionserve.benchmarks.perf_analyzer import main

if __name__ == "__main__":
    raise SystemExit(main())
