"""Breathing metrics against analytic motions: z-scalings of box lungs, constant world translations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsynth.data.fields import mm_to_voxel
from medsynth.evaluate.breathing import BreathingCase, breathing_metrics, lung_volume_curve, superior_excursion_mm, volume_ssim
from medsynth.motion.fields import warp_image
from oblique_geometry import oblique_affine

AFFINE = oblique_affine((1.2, 0.9, 2.5))  # oblique and anisotropic: world z is no array axis


def z_scaling(shape, s: float, centre: float) -> torch.Tensor:
    """The voxel field ``(3, *shape)`` u_z = (s - 1)(z - centre), zero in x and y: warp_image(m, u)(x, y, z) =
    m(x, y, centre + s (z - centre)), so a mask's extent along z is divided by ``s``."""
    field = torch.zeros(3, *shape, dtype=torch.float64)
    z = torch.arange(shape[2], dtype=torch.float64)
    field[2] = ((s - 1.0) * (z - centre))[None, None, :]
    return field


def box(shape, z0: int, z1: int) -> torch.Tensor:
    """A bool box mask ``(*shape)`` over x, y in [1, X - 2], z in [z0, z1], inside the grid."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[1:-1, 1:-1, z0 : z1 + 1] = True
    return mask


def test_lung_volume_curve_of_a_uniform_z_scaling():
    shape, centre, half = (6, 6, 48), 24, 8
    lung = box(shape, centre - half, centre + half)  # 17 slices; stretched by 2 it spans z 7..41, inside the grid
    fields = torch.stack([torch.zeros(3, *shape, dtype=torch.float64), z_scaling(shape, 0.5, centre), z_scaling(shape, 1.6, centre)])
    curve = lung_volume_curve(lung, fields)
    assert curve.shape == (3,)
    assert curve[0].item() == 1.0  # the zero field samples every voxel at its own centre: exactly the mask
    # s = 1/2: each column is the piecewise-linear interpolant of the box profile, stretched by 2, whose kinks then
    # fall on voxel centres; the sum over voxels of a piecewise-linear function with kinks on the samples and zero
    # at the ends is its integral (trapezoidal rule), so the volume is exactly 1 / s = 2 (float rounding only).
    assert curve[1].item() == pytest.approx(2.0, abs=1e-5)
    # s = 1.6: the kinks fall between voxel centres. The profile along z is unimodal with a peak of 1, and the sum
    # over integers of a unimodal function differs from its integral (17 / s slices) by at most its peak, one slice:
    # a relative error of at most 1 / 17 of the reference volume.
    assert abs(curve[2].item() - 1 / 1.6) <= 1 / (2 * half + 1)
    assert curve[2].item() < 1.0


def test_superior_excursion_is_the_world_z_component():
    shape = (8, 7, 5)
    d = torch.tensor([4.0, -2.5, 3.0], dtype=torch.float64)  # mm, RAS: 3 mm along world z (superior)
    field = mm_to_voxel(d[:, None, None, None].expand(3, *shape), AFFINE)
    assert not torch.allclose(field[2].abs(), torch.tensor(3.0, dtype=torch.float64))  # array axis 2 alone is not the SI component
    region = torch.zeros(shape, dtype=torch.bool)
    region[2:6, 2:5, 1:4] = True
    assert superior_excursion_mm(field, AFFINE, region) == pytest.approx(3.0, abs=1e-5)
    assert superior_excursion_mm(-field, torch.from_numpy(AFFINE), region) == pytest.approx(3.0, abs=1e-5)  # a magnitude
    assert math.isnan(superior_excursion_mm(field, AFFINE, torch.zeros(shape, dtype=torch.bool)))


def breathing_case(shape, scales, centre: int, half: int) -> BreathingCase:
    """A subject whose phase-t lung is its reference box lung warped by the z-scaling ``scales[t]`` (thresholded)."""
    reference = box(shape, centre - half, centre + half)
    fields = torch.stack([z_scaling(shape, s, centre) for s in scales]).float()
    warped = warp_image(reference.float()[None, None].expand(len(scales), 1, *shape), fields)[:, 0]
    return BreathingCase(lungs=warped >= 0.5, fields=fields, affine=AFFINE, reference_phase=0)


def test_breathing_metrics_of_the_real_motion_and_of_no_motion():
    shape, centre, half = (4, 4, 96), 48, 32  # a 65-slice lung: one slice is 1.5 % of it
    cases = [breathing_case(shape, (1.0, 1.2, 1.45, 1.15), centre, half), breathing_case(shape, (1.0, 1.1, 1.3, 1.05), centre, half)]
    assert torch.equal(cases[0].lungs[0], box(shape, centre - half, centre + half))  # the zero field keeps the reference lung
    generated = [torch.stack([case.fields, case.fields]) for case in cases]  # N = 2 copies of the real motion
    metrics = breathing_metrics(cases, generated)
    assert metrics["end_exhale_phase"] == 2  # the most compressed phase: the smallest lung
    # The real curve warps the reference lung by the real fields, as the generated one by the generated fields:
    # the same measure, so equal motions give equal curves; both lie within a slice of the analytic volumes.
    real = np.mean([lung_volume_curve(case.lungs[0], case.fields).tolist() for case in cases], axis=0)
    assert metrics["lung_volume_curve_real"] == pytest.approx(real.tolist())
    assert metrics["lung_volume_ratio_real"] == pytest.approx(real[2])
    assert metrics["lung_volume_curve_generated"] == pytest.approx(metrics["lung_volume_curve_real"], abs=1e-6)
    assert metrics["lung_volume_ratio_generated"] == pytest.approx(np.mean([1 / 1.45, 1 / 1.3]), abs=1 / 65)
    assert metrics["lung_volume_curve_generated"][0] == pytest.approx(1.0)
    # The excursion is the SI (world z) displacement in the exhale lung; equal motions give equal excursions.
    assert metrics["diaphragm_excursion_generated_mm"] == pytest.approx(metrics["diaphragm_excursion_real_mm"])
    assert metrics["diaphragm_excursion_real_min_mm"] < metrics["diaphragm_excursion_real_max_mm"]
    assert metrics["diaphragm_excursion_generated_in_real_range"] == 1.0

    zero = [torch.zeros_like(motions) for motions in generated]
    still = breathing_metrics(cases, zero)
    assert still["lung_volume_ratio_generated"] == pytest.approx(1.0, abs=1e-6)
    assert still["lung_volume_curve_generated"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert still["diaphragm_excursion_generated_mm"] == 0.0
    assert still["diaphragm_excursion_generated_in_real_range"] == 0.0  # no motion lies outside the real excursions
    assert still["lung_volume_ratio_real"] == metrics["lung_volume_ratio_real"]  # the real side does not depend on the generated


def test_excursion_range_takes_the_other_subjects():
    shape, centre, half = (4, 4, 96), 48, 32
    held_out = [breathing_case(shape, (1.0, 1.2, 1.45, 1.15), centre, half)]
    other = breathing_case(shape, (1.0, 1.5, 2.0, 1.4), centre, half)  # breathes deeper: widens the real range
    generated = [torch.stack([held_out[0].fields])]
    alone, wider = breathing_metrics(held_out, generated), breathing_metrics(held_out, generated, others=[other])
    assert alone["diaphragm_excursion_real_min_mm"] == alone["diaphragm_excursion_real_max_mm"]
    assert wider["diaphragm_excursion_real_max_mm"] > alone["diaphragm_excursion_real_max_mm"]
    assert wider["diaphragm_excursion_real_min_mm"] == alone["diaphragm_excursion_real_min_mm"]
    assert wider["diaphragm_excursion_generated_in_real_range"] == 1.0


def test_volume_ssim_is_one_for_identical_volumes_and_adapts_to_thin_axes():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 16, 16, 3, generator=g)  # 3 slices: a 7-voxel window would not fit
    assert volume_ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    b = (a + 0.3 * torch.rand(2, 1, 16, 16, 3, generator=g)).clamp(0, 1)
    assert 0.0 < volume_ssim(a, b) < 0.99
    assert volume_ssim(a, b) == pytest.approx(volume_ssim(b, a), abs=1e-6)
    even = torch.rand(1, 1, 16, 16, 4, generator=g)  # an even thin axis gets an odd window (3)
    assert volume_ssim(even, even) == pytest.approx(1.0, abs=1e-6)
