"""stbench: a plugin-based model zoo and benchmark harness for spatial gene expression from H&E.

A plugin needs one import::

    from stbench import hookimpl

and implements one or more hooks of :mod:`stbench.hookspecs`. This module stays light: importing it
does not import torch, pandas or any method.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("stbench")

__all__ = ["hookimpl", "__version__"]
