"""Build zrouter's optional compiled modules (zrouter/_native/*.pyx); the rest is in setup.cfg.

They are optional twice over: with no Cython or no C compiler, or when a module fails to
compile, the install goes on without it (``optional=True``), and at run time zrouter/_speedups.py
falls back to the pure-Python path when a module is missing or fails to import.

No libzmq is linked here and no zmq.h is needed: pyzmq's wheel ships libzmq under a name that
changes with every pyzmq build, and the pyzmq in pip's isolated build environment need not be
the one installed next to zrouter. The compiled modules look up the few libzmq functions they
call at import time, in the library that the running pyzmq itself loaded (see
zrouter/_native/_zmq.pxd), so they always call the exact libzmq behind pyzmq's sockets.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup

MODULES = ["codec", "wire", "drain", "sets", "route", "client"]


def extensions() -> list[Extension]:
    if os.environ.get("ZROUTER_NO_EXTENSIONS") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("zrouter: Cython is not installed; installing the pure-Python path only", file=sys.stderr)
        return []
    exts = [
        Extension(f"zrouter._native.{name}", [f"zrouter/_native/{name}.pyx"], optional=True,
                  extra_compile_args=["-O2"])
        for name in MODULES
    ]
    built: list[Extension] = cythonize(exts, compiler_directives={"language_level": "3"}, quiet=True)
    for ext in built:
        ext.optional = True  # cythonize makes new Extensions and drops the flag
    return built


setup(ext_modules=extensions())
