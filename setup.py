"""Build of fastntk's Cython extension modules (metadata lives in setup.cfg)."""

import sys
from pathlib import Path

import numpy as np
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


# NumPy's headers, and its static library of random distributions (the
# training loop draws its shuffles with numpy.random's own C functions).
NUMPY_INCLUDE = np.get_include()
NUMPY_RANDOM_LIB = str(Path(NUMPY_INCLUDE).parent.parent / "random" / "lib")


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
                include_dirs=[NUMPY_INCLUDE],
                library_dirs=[NUMPY_RANDOM_LIB],
                libraries=["npyrandom"],
                extra_compile_args=["-O3", *OPENMP],
                extra_link_args=OPENMP,
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )
    return cythonize(mods, compiler_directives=DIRECTIVES)


setup(ext_modules=extensions())
