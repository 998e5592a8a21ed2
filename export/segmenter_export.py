"""``python -m export.segmenter_export``: thin entry point; the code is :mod:`lesionserve.export.segmenter_export`."""
from lesionserve.export.segmenter_export import main

if __name__ == "__main__":
    raise SystemExit(main())
