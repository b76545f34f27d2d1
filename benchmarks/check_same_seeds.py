"""Same seeds, same numbers: every recipe's tiny example through the whole chain, fingerprinted, to compare two commits.

For each recipe (default: all of ``RECIPES``) its ``tiny_example`` goes phantom -> prepare -> train 3 epochs -> sample 2
-> evaluate, seed 0, one thread; the numeric metrics and a SHA-256 of the decompressed sample files are written to
``OUT/equiv.json`` and printed. Run it on two commits (one from a ``git worktree`` with ``PYTHONPATH=<worktree>/src``) and
diff the two files: a refactor that keeps behaviour gives identical numbers and hashes (issue 23)::

    git worktree add /tmp/before <commit> && PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/check_same_seeds.py /tmp/b
    .venv/bin/python benchmarks/check_same_seeds.py /tmp/a
    .venv/bin/python benchmarks/check_same_seeds.py --compare /tmp/b /tmp/a
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path


def fingerprint(out: Path, names: list[str]) -> dict[str, dict]:
    import torch

    from medsynth import api
    from medsynth.recipes import RECIPES, get_recipe

    torch.set_num_threads(1)
    result = {}
    for name in names or list(RECIPES):
        example = get_recipe(name).tiny_example
        root = out / name
        raw = api.phantom(example.phantom, root / "raw", n=example.n, seed=0, size=example.size, progress=False, **example.phantom_options)
        prepared = api.prepare(raw, root / "prepared", recipe=name, progress=False, **example.prepare)
        run = api.train(name, data=prepared, config=example.config, overrides=[*example.overrides, "train.max_epochs=3"],
                        out=root / "run", progress=False, force=True)
        api.sample(run.path, n=2, seed=0, progress=False, force=True)
        digest = hashlib.sha256()
        for path in sorted(Path(run.path, "samples").rglob("*")):
            if path.is_file() and path.suffix in (".gz", ".png", ".npy", ".nii"):
                digest.update(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())  # gzip headers hold times
        metrics = api.evaluate(run.path, progress=False)
        result[name] = {"samples_sha256": digest.hexdigest()[:16],
                        **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        print(name, json.dumps(result[name], sort_keys=True), flush=True)
    (out / "equiv.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def compare(before: Path, after: Path) -> int:
    """Print, per recipe, 'same' or the keys that differ; exit status 1 when any does."""
    a, b = (json.loads((folder / "equiv.json").read_text()) for folder in (before, after))
    differ = 0
    for name in a:
        keys = [k for k in a[name] if a[name][k] != b.get(name, {}).get(k)]
        differ += bool(keys)
        print(name, f"{len(a[name])} keys", "same" if not keys else f"differ: {', '.join(keys[:8])}")
    return int(differ > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="+", help="the output folder (with --compare: the two folders)")
    parser.add_argument("--recipes", nargs="*", default=[], help="recipes to run (default: every one in RECIPES)")
    parser.add_argument("--compare", action="store_true", help="compare two earlier outputs instead of running")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.out[:2]))
    fingerprint(args.out[0], args.recipes)


if __name__ == "__main__":
    main()
