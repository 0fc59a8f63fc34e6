"""Engines: gradients and Jacobians, the NTK, the training loop."""
