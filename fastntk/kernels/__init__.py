"""Compute kernels, one module per backend, behind one dispatch.

- :mod:`fastntk.kernels.cpu`: Numba kernels of the forward and backward passes.
- :mod:`fastntk.kernels.reference`: plain NumPy, the baseline every fast path is
  tested against.

Kernels take raw arrays (flat parameters, integer widths, activation code) and
know nothing of the model classes above them.
"""
