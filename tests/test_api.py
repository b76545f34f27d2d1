"""The Python API refuses bad requests before the first write: one line naming the file or the setting and the
problem (a MedsynthError the CLI prints without a traceback), and the folders it was given unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsynth import api
from medsynth.data.phantoms.cilia import make_cilia_dataset
from medsynth.errors import BadInputError, MedsynthError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A prepared cilia dataset (2 images a class, 10 subjects, 32 px), an empty folder and a run folder with only its
    config (trained never: no checkpoint)."""
    root = tmp_path_factory.mktemp("api")
    make_cilia_dataset(root / "raw", n_per_class=2, size=32, seed=0)
    api.prepare(root / "raw", root / "prepared", size=32, normalize="none", seed=0, progress=False)
    (root / "empty").mkdir()
    (root / "run").mkdir()
    (root / "run" / "config.yaml").write_text("recipe: cvae\n")
    (root / "plan.yaml").write_text("kept: true\n")
    return root


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _refused(root: Path, call, error: type[MedsynthError], pattern: str) -> str:
    before = _tree(root)
    with pytest.raises(error, match=pattern) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert _tree(root) == before, "a refused call wrote or changed something"
    return message


def test_train_names_what_is_missing(root):
    _refused(root, lambda: api.train(None, data=root / "prepared", out=root / "new"), MedsynthError,
             "name a recipe, or --resume RUN")
    _refused(root, lambda: api.train("gan", data=root / "prepared", out=root / "new"), MedsynthError,
             r"unknown recipe 'gan' \(known: .*cvae")
    _refused(root, lambda: api.train("cvae", out=root / "new"), MedsynthError, "--data DIR .* is required")
    message = _refused(root, lambda: api.train("cvae", data=root / "empty", out=root / "new"), BadInputError,
                       "not a prepared dataset")
    assert message.startswith(str(root / "empty"))


def test_train_refuses_a_bad_setting_a_missing_init_and_conflicting_options_before_writing(root):
    prepared = root / "prepared"
    _refused(root, lambda: api.train("cvae", data=prepared, out=root / "new", overrides=["train.lr=-1"]), MedsynthError,
             r"--set train.lr=-1: train.lr: .*greater than 0")
    _refused(root, lambda: api.train("cvae", data=prepared, out=root / "new", overrides=["train.nope=1"]), MedsynthError,
             "unknown config key 'train.nope'")
    message = _refused(root, lambda: api.train("cvae", data=prepared, out=root / "new", init=root / "none.safetensors"),
                       BadInputError, "no such weights file")
    assert str(root / "none.safetensors") in message
    _refused(root, lambda: api.train("cvae", data=prepared, init=root / "run", resume=root / "run"), MedsynthError, "use one")
    _refused(root, lambda: api.train("cvae", data=prepared, folds=2, resume=root / "run"), MedsynthError, "use one")


def test_a_fold_set_larger_than_the_subjects_is_refused_naming_the_data(root):
    message = _refused(root, lambda: api.train("cvae", data=root / "prepared", folds=11, out=root / "folds"), BadInputError,
                       r"--folds 11 is larger than the number of subjects \(10\)")
    assert message.startswith(str(root / "prepared"))


def test_resume_needs_a_checkpoint_of_the_same_recipe(root):
    _refused(root, lambda: api.train(resume=root / "run"), BadInputError, "no checkpoints/last.ckpt to resume from")
    _refused(root, lambda: api.train("sdm", resume=root / "run"), MedsynthError, "this run trains 'cvae', not 'sdm'")


def test_sample_evaluate_and_report_refuse_a_missing_run_or_a_bad_request(root):
    for call in (lambda: api.sample(root / "nope"), lambda: api.evaluate(root / "nope"), lambda: api.report(root / "nope")):
        message = _refused(root, call, BadInputError, "not a run directory")
        assert message.startswith(str(root / "nope"))
    _refused(root, lambda: api.sample(root / "run", mode="bogus"), MedsynthError,
             r"recipe 'cvae' has no mode 'bogus' \(its modes: random")
    _refused(root, lambda: api.sample(root / "run", n=0), MedsynthError, r"--n must be at least 1 \(got 0\)")


def test_phantom_prepare_plan_register_and_reconstruct_refuse_before_writing(root):
    _refused(root, lambda: api.phantom("brain", root / "ph"), MedsynthError, r"unknown phantom 'brain' \(known: cilia")
    _refused(root, lambda: api.phantom("cilia", root / "ph", n=1, size=32, progress=False, frames=3), MedsynthError,
             "unknown option 'frames'")
    _refused(root, lambda: api.prepare(root / "nosrc", root / "out"), BadInputError, "not found")
    _refused(root, lambda: api.prepare(root / "raw", root / "raw"), BadInputError, "--out is the input")
    _refused(root, lambda: api.plan(root / "prepared", "cvae", root / "plan.yaml"), BadInputError, "exists; give --force")
    _refused(root, lambda: api.register(root / "a.nii.gz", root / "b.nii.gz"), MedsynthError, "register: --out is required")
    _refused(root, lambda: api.reconstruct(None, root / "sa.nii.gz"), MedsynthError, "reconstruct: --out is required")
    _refused(root, lambda: api.reconstruct(None, root / "sa.nii.gz", out=root / "x.png"), BadInputError, "must be a NIfTI file")
    _refused(root, lambda: api.estimate(None), MedsynthError, "name a recipe")
