"""zrouter's optional compiled modules (Cython; built by ``pip install``, see setup.py).

Never import these directly: :mod:`zrouter._speedups` decides, once per process, whether the
compiled path or the pure-Python reference runs, and hands out the right functions.
"""

__all__: list[str] = []
