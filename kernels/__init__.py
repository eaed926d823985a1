"""Triton kernels, installed as ``torchao_eora.kernels``.

When the repository root is on ``sys.path`` (``python -m ...`` run from a checkout), this folder would shadow
Hugging Face's ``kernels`` package, which transformers imports; hand that import over to the real package.
"""

if __name__ == "kernels":
    import importlib
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    try:
        del sys.modules["kernels"]
        sys.modules["kernels"] = importlib.import_module("kernels")  # the import statement returns this entry
    finally:
        sys.path[:] = _path
