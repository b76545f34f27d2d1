"""medsynth: conditional generative synthesis of medical images and motion.

The Python API lives in :mod:`medsynth.api`; the CLI (`medsynth`) is a thin layer over it.
"""

__version__ = "0.1.0"
