"""The 3D path of the cvae recipe: class-labelled volumes -> prepare -> train -> NIfTI samples on the data's grid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from medsynth import api

AFFINE = np.array([[0.5, 0, 0, -4.0], [0, 0.7, 0, 2.0], [0, 0, 1.2, 10.0], [0, 0, 0, 1]])


def write_dataset(root) -> None:
    """Two classes of 16^3 volumes (a ball, a box), listed in a medsynth dataset.json."""
    grid = np.stack(np.meshgrid(*[np.arange(16.0) - 7.5] * 3, indexing="ij"))
    rng = np.random.default_rng(0)
    cases = []
    for name, shape in (("ball", (grid ** 2).sum(0) < 36), ("box", np.abs(grid).max(0) < 5)):
        for k in range(5):
            volume = (shape * 0.8 + 0.1 * rng.random((16, 16, 16))).astype(np.float32)
            path = root / "images" / f"{name}_{k}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume, AFFINE), str(path))
            cases.append({"id": f"{name}_{k}", "subject": f"{name}_{k}", "image": f"images/{path.name}", "class": name})
    (root / "dataset.json").write_text(json.dumps({"name": "shapes", "spatial_dims": 3, "modality": "MR", "classes": ["ball", "box"],
                                                   "labels": {}, "cases": cases}))


def test_cvae_trains_on_volumes_and_samples_nifti_with_the_data_affine(tmp_path):
    write_dataset(tmp_path / "raw")
    prepared = api.prepare(tmp_path / "raw", tmp_path / "prepared", size=16, normalize="none", seed=0, progress=False)
    run = api.train("cvae", data=prepared, overrides=["model.channels=[4, 8]", "model.strides=[2, 2]", "model.latent_size=4",
                                                      "model.embed_dim=2", "train.batch_size=4", "train.num_threads=1", "train.max_epochs=1"],
                    out=tmp_path / "run", progress=False)
    written = api.sample(run.path, n=2, seed=0, out=tmp_path / "samples")
    assert sorted(p.name for p in written) == ["ball_000.nii.gz", "ball_001.nii.gz", "box_000.nii.gz", "box_001.nii.gz"]
    image = nib.load(written[0])
    assert image.shape == (16, 16, 16)
    assert np.allclose(image.affine, AFFINE, atol=1e-5)
    data = np.asarray(image.dataobj)
    assert 0.0 <= data.min() and data.max() <= 1.0 and data.std() > 0  # the decoder's sigmoid range, the data's units
