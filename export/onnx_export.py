"""``python -m export.onnx_export``: thin entry point; the code is :mod:`lesionserve.export.onnx_export`."""
from lesionserve.export.onnx_export import main

if __name__ == "__main__":
    raise SystemExit(main())
