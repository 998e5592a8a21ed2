"""``python -m training.synthetic``: thin entry point; the renderer is :mod:`lesionserve.synthetic`."""
from lesionserve.synthetic import main

if __name__ == "__main__":
    raise SystemExit(main())
