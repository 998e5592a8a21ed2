"""``python -m training.evaluate_maps``: thin entry point; the code is :mod:`lesionserve.training.map_eval`."""
from lesionserve.training.map_eval import main

if __name__ == "__main__":
    raise SystemExit(main())
