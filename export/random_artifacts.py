"""``python -m export.random_artifacts``: thin entry point; the code is :mod:`lesionserve.export.random_artifacts`."""
from lesionserve.export.random_artifacts import main

if __name__ == "__main__":
    raise SystemExit(main())
