"""``python -m benchmarks.explain_overhead``: thin entry point; the code is :mod:`lesionserve.benchmarks.explain_overhead`."""
from lesionserve.benchmarks.explain_overhead import main

if __name__ == "__main__":
    raise SystemExit(main())
