"""Build of fastntk's Cython extension modules (metadata lives in setup.cfg)."""

import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

# Cython compiler directives, for every extension module, set here only.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "nonecheck": False,
}


# OpenMP for the thread team of the training loop; where the compiler lacks
# it (Apple's clang, MSVC), that loop runs on one thread.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def extensions():
    root = Path(__file__).parent
    mods = []
    for pyx in sorted(root.glob("fastntk/**/*.pyx")):
        rel = pyx.relative_to(root)
        name = ".".join(rel.with_suffix("").parts)
        mods.append(
            Extension(
                name,
                [str(rel)],
                extra_compile_args=["-O3", *OPENMP],
                extra_link_args=OPENMP,
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )
    return cythonize(mods, compiler_directives=DIRECTIVES)


setup(ext_modules=extensions())
