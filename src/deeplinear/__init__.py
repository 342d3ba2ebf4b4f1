"""deeplinear: nonlinear computation in deep linear networks, through float underflow."""

__version__ = "0.1.0"
