"""lfm.integrations.ray on a local Ray instance (one CPU) over the tiny model; skipped
when Ray is not installed (pip install 'lfm[ray]')."""

from __future__ import annotations

import json
import pathlib

import pytest
from conftest import IMAGES, MODELS

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


# Ray itself raises deprecation warnings from its internals.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_map_batches_over_images(local_ray) -> None:  # type: ignore[no-untyped-def]
    from lfm.integrations.ray import LfmPredictor

    paths = [str(IMAGES / n) for n in ("grad_64x48.png", "grad_120x80.jpg", "exif_6.jpg")]
    blobs = [{"path": p, "bytes": pathlib.Path(p).read_bytes()} for p in paths] + [{"path": "junk", "bytes": b"junk"}]
    ds = ray.data.from_items(blobs)
    out = ds.map_batches(
        LfmPredictor,
        fn_constructor_kwargs={
            "model": str(MODELS / "tiny16"),
            "task": "image-analysis",
            "options": {"max_new_tokens": 300, "temperature": 1.0, "seed": 1},
        },
        concurrency=1,
        batch_size=2,
        num_cpus=1,
    ).take_all()
    # Ray Data does not keep the order of blocks across actors: match rows by path.
    by_path = {r["path"]: r for r in out}
    assert sorted(by_path) == sorted([*paths, "junk"]) and len(out) == 4
    assert by_path["junk"]["error"].startswith("ImageError")
    for p in paths:
        assert by_path[p]["error"] or json.loads(by_path[p]["output"])
