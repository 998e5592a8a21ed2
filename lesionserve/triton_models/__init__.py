"""Model classes shared by several Triton python models (imported by their ``1/model.py``).

Only importable inside Triton's python backend stub (they use ``triton_python_backend_utils``).
"""
