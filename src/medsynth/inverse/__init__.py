"""Inverse problems: reconstructing volumes from what a scanner acquired.

- :mod:`.planes`: typed imaging planes read from NIfTI affines (:class:`Plane`, one per long-axis
  image or per slice of a short-axis stack), and the geometry of a through-plane-refined stack
  (:func:`fine_stack_affine`: acquired slice k is fine slice k * factor).
- :mod:`.operators`: linear, differentiable measurement operators with adjoints: a volume sampled on
  a plane's pixel grid with a slice profile (:class:`PlaneOperator`), a fine volume seen as a
  thick-slice stack (:class:`SliceStackOperator`).
- :mod:`.prior`: the :class:`SlicePrior` protocol (a DiffAE/DDIM slice prior) and code interpolation.
- :mod:`.latent`, :mod:`.pnp`, :mod:`.reconstruct`: a fine SAX volume from a thick-slice stack and LAX views
  (:func:`reconstruct_stack` for one frame, :func:`reconstruct_files` for a cine series): latent
  optimisation of the codes (``latent``) or of the voxels (``pnp``) with the prior, or through-plane
  interpolation.

Geometry is in world (RAS) millimetres throughout; volumes are (B, C, X, Y, Z) with their 4x4 affine.
"""

from medsynth.inverse.latent import ReconstructionHistory, ReconstructSettings
from medsynth.inverse.operators import PlaneOperator, SliceStackOperator, slice_profile
from medsynth.inverse.planes import (
    Plane,
    fine_stack_affine,
    fine_stack_shape,
    pixel_points,
    planes_of_stack,
    stack_slice_axis,
)
from medsynth.inverse.prior import SlicePrior
from medsynth.inverse.reconstruct import BASELINES, METHODS, interpolate_stack, reconstruct_files, reconstruct_stack

__all__ = [
    "BASELINES",
    "METHODS",
    "Plane",
    "PlaneOperator",
    "ReconstructSettings",
    "ReconstructionHistory",
    "SlicePrior",
    "SliceStackOperator",
    "fine_stack_affine",
    "fine_stack_shape",
    "interpolate_stack",
    "pixel_points",
    "planes_of_stack",
    "reconstruct_files",
    "reconstruct_stack",
    "slice_profile",
    "stack_slice_axis",
]
