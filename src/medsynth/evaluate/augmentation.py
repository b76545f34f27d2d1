"""Classic augmentation, as a user gets it for free: the baseline generated images must beat.

nnU-Net's default augmentation, with MONAI transforms: flips, rotations, scaling, elastic
deformation, intensity scale and shift, Gaussian noise. Image and label map (when there is one)
move together; the label map is resampled by nearest neighbour.
"""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)


def classic_augmentation(spatial_dims: int, with_label: bool, seed: int = 0, noise_std: float = 0.05) -> Compose:
    """A seeded MONAI ``Compose`` of dictionary transforms on ``{"image": (C, *S)[, "label": (1, *S)]}``.

    Args:
        spatial_dims: 2 or 3.
        with_label: also move ``"label"`` (nearest neighbour) with the image.
        seed: of the transforms' random state.
        noise_std: Gaussian noise sd, in the image's units (images in [0, 1] or standardised).
    """
    keys = ("image", "label") if with_label else ("image",)
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    angle = math.radians(15.0)
    elastic = (Rand2DElasticd(keys=keys, spacing=(8, 8), magnitude_range=(1, 2), prob=0.2, mode=modes, padding_mode="border")
               if spatial_dims == 2 else
               Rand3DElasticd(keys=keys, sigma_range=(4, 6), magnitude_range=(30, 60), prob=0.2, mode=modes, padding_mode="border"))
    transform = Compose([
        *(RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)),
        RandAffined(keys=keys, prob=0.5, rotate_range=(angle,) * (1 if spatial_dims == 2 else 3), scale_range=(0.1,) * spatial_dims,
                    mode=modes, padding_mode="border"),
        elastic,
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        RandGaussianNoised(keys="image", std=noise_std, prob=0.3),
    ])
    transform.set_random_state(seed=seed)
    return transform
