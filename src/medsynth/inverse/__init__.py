"""Inverse problems: reconstructing volumes from what a scanner acquired.

- :mod:`.planes`: typed imaging planes read from NIfTI affines (:class:`Plane`, one per long-axis
  image or per slice of a short-axis stack), and the geometry of a through-plane-refined stack
  (:func:`fine_stack_affine`: acquired slice k is fine slice k * factor).
- :mod:`.operators`: linear, differentiable measurement operators with adjoints: a volume sampled on
  a plane's pixel grid with a slice profile (:class:`PlaneOperator`), a fine volume seen as a
  thick-slice stack (:class:`SliceStackOperator`).

Geometry is in world (RAS) millimetres throughout; volumes are (B, C, X, Y, Z) with their 4x4 affine.
"""

from medsynth.inverse.operators import PlaneOperator, SliceStackOperator, slice_profile
from medsynth.inverse.planes import (
    Plane,
    fine_stack_affine,
    fine_stack_shape,
    pixel_points,
    planes_of_stack,
    stack_slice_axis,
)

__all__ = [
    "Plane",
    "PlaneOperator",
    "SliceStackOperator",
    "fine_stack_affine",
    "fine_stack_shape",
    "pixel_points",
    "planes_of_stack",
    "slice_profile",
    "stack_slice_axis",
]
