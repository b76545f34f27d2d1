"""Oblique, anisotropic affines for geometry tests (shared by tests/inverse)."""

from __future__ import annotations

import numpy as np


def rotation(axis, angle_deg):
    """Rodrigues' rotation matrix (3, 3) about ``axis`` by ``angle_deg``."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(a) * cross + (1 - np.cos(a)) * cross @ cross


def oblique_affine(spacing, origin=(-40.0, 25.0, 12.5), axis=(1.0, -2.0, 0.5), angle=37.0):
    """A 4x4 affine: a rotation (right-handed, tilted against every world axis) times the spacing (mm)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(axis, angle) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def world(affine, index):
    """World positions (..., 3) mm of voxel indices (..., 3)."""
    return np.asarray(index, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]
