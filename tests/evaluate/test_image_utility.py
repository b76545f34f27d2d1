"""The image utility protocol (TSTR, augmentation test) and the sharpness measure, on cases whose answer is known."""

from __future__ import annotations

import pytest
import torch
from monai.networks.layers import GaussianFilter

from medsynth.errors import MedsynthError
from medsynth.evaluate.augmentation import classic_augmentation
from medsynth.evaluate.image_utility import ImageTask, augmentation_test, gain_share, labelled_pools, tstr
from medsynth.evaluate.metrics import high_frequency_share, real_reference, spectrum_ratio_high


def _noise(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand((n, 1, size, size), generator=torch.Generator().manual_seed(seed))


def test_blur_lowers_the_high_frequency_share_and_real_against_real_is_about_one():
    real = _noise(16, 0)
    blurred = GaussianFilter(spatial_dims=2, sigma=1.5)(real)
    assert 0.6 < high_frequency_share(real) < 0.9  # white noise: power spread evenly over the disc's area
    assert spectrum_ratio_high(real, blurred) < 0.1
    assert real_reference(spectrum_ratio_high, real) == pytest.approx(1.0, abs=0.05)
    volumes = torch.rand((2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    assert 0.0 < high_frequency_share(volumes) < 1.0


def test_pools_keep_the_class_balance_and_refuse_an_empty_pool():
    classes = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    labelled, unlabelled = labelled_pools(classes, 6, seed=0, setting="evaluate.n_labelled")
    assert sorted(classes[labelled].tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(torch.cat([labelled, unlabelled]).tolist()) == list(range(12))
    assert torch.equal(labelled, labelled_pools(classes, 6, seed=0, setting="s")[0])
    for bad in (0, 12):
        with pytest.raises(MedsynthError, match="evaluate.n_labelled"):
            labelled_pools(classes, bad, seed=0, setting="evaluate.n_labelled")


def _mean_task() -> ImageTask:
    """A 'network' that learns the mean intensity of each class and classifies by the nearest mean; augmentation adds noise."""

    def train(images, targets, seed, augmentation):
        if augmentation == "classic":
            images = images + torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        means = torch.stack([images[targets == k].mean() for k in range(2)])
        model = torch.nn.Module()
        model.means = means
        return model

    def score(model, images, targets):
        predicted = (images.mean(dim=(1, 2, 3))[:, None] - model.means[None]).abs().argmin(dim=1)
        return float((predicted == targets).float().mean())

    return ImageTask("accuracy", train, score)


def test_generated_copies_of_the_real_pool_reach_the_oracle_and_wrong_ones_do_not():
    generator = torch.Generator().manual_seed(0)
    targets = torch.tensor([0, 1] * 20)
    images = targets.float().view(-1, 1, 1, 1) * 0.2 + 0.4 + 0.15 * torch.randn((40, 1, 4, 4), generator=generator)
    labelled, unlabelled = (images[:2], targets[:2]), (images[2:30], targets[2:30])
    test = (images[30:], targets[30:])
    copies = augmentation_test(_mean_task(), labelled, unlabelled, images[2:30], test, seeds=[0, 1])
    assert copies["downstream_accuracy_with_generated"] == copies["downstream_accuracy_oracle"]
    assert copies["downstream_gain_share_generated"] in (None, 1.0)
    assert copies["downstream_n_labelled"] == 2 and copies["downstream_n_unlabelled"] == 28 and copies["downstream_seeds"] == 2
    assert "downstream_accuracy_classic_sd" in copies and len(copies["downstream_accuracy_oracle_per_seed"]) == 2
    swapped = augmentation_test(_mean_task(), labelled, unlabelled, images[2:30].flip(0) * 0 + 0.5, test, seeds=[0])
    assert swapped["downstream_accuracy_with_generated"] <= swapped["downstream_accuracy_oracle"]
    result = tstr(_mean_task(), (images[:30], targets[:30]), (images[:30], targets[:30]), test, seeds=[0])
    assert result["tstr_accuracy"] == result["tstr_accuracy_real_reference"]
    assert gain_share(0.5, 0.75, 1.0) == 0.5 and gain_share(0.5, 0.6, 0.5) is None


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_classic_augmentation_moves_image_and_label_together_and_is_seeded(spatial_dims):
    size = (16,) * spatial_dims
    image = torch.zeros((1, *size))
    image[(0, *(slice(4, 10),) * spatial_dims)] = 1.0
    label = (image > 0.5).float()
    outputs = [classic_augmentation(spatial_dims, with_label=True, seed=3)({"image": image.clone(), "label": label.clone()}) for _ in range(2)]
    assert torch.equal(torch.as_tensor(outputs[0]["image"]), torch.as_tensor(outputs[1]["image"]))
    moved_label = torch.as_tensor(outputs[0]["label"])
    assert set(moved_label.unique().tolist()) <= {0.0, 1.0}  # nearest neighbour: still a label map


def test_classic_augmentation_mirrors_only_the_axes_asked_for_and_the_segmenter_keeps_sides(monkeypatch):
    # A left and a right structure (classes 1 and 2) on either side of axis 0's centre, as the phantom's chambers.
    label = torch.zeros((1, 16, 16, 16))
    label[0, 2:6, 5:11, 5:11], label[0, 10:14, 5:11, 5:11] = 1, 2

    def swapped(flip_axes) -> int:
        count = 0
        for seed in range(12):
            moved = torch.as_tensor(classic_augmentation(3, with_label=True, seed=seed, flip_axes=flip_axes)(
                {"image": label / 2, "label": label.clone()})["label"])[0]
            centres = [torch.nonzero(moved == k)[:, 0].float().mean() for k in (1, 2)]
            assert not any(torch.isnan(c) for c in centres)  # both structures survive the resampling
            count += int(centres[0] > centres[1])
        return count

    assert swapped(()) == 0  # rotation, scaling and elastic deformation keep each structure on its side
    assert swapped(None) > 0  # nnU-Net's default mirrors every axis: the sides swap in some samples

    import medsynth.evaluate.segmentation as segmentation

    asked = []
    monkeypatch.setattr(segmentation, "classic_augmentation", lambda *args, **kwargs: asked.append(kwargs["flip_axes"]) or
                        classic_augmentation(*args, **kwargs))
    segmentation.train_segmenter(label[None] / 2, label.long(), 3, epochs=1, channels=(2, 4), augmentation="classic")
    assert asked == [()]  # the segmenter's default: no mirroring of left/right label maps
