"""instseg-train --profile: the stage timer (instseg.engine.profile) and the matching regions that
every model's criterion marks; on a tiny generated smoke set (no shared data needed)."""
from __future__ import annotations

import time

import pytest

from instseg.utils.profiling import collect_regions, region


def test_region_is_a_no_op_outside_collect_and_adds_up_inside():
    with region("matching"):  # no collector: nothing recorded, no error
        pass
    with collect_regions() as outer:
        with region("a"):
            time.sleep(0.02)
        with collect_regions() as inner:  # the innermost collector gets the time
            with region("a"):
                time.sleep(0.01)
        with region("a"):
            time.sleep(0.02)
        with region("b"):
            pass
    assert set(outer) == {"a", "b"} and set(inner) == {"a"}
    assert 0.04 <= outer["a"] < 0.2 and 0.01 <= inner["a"] < outer["a"]
    with collect_regions() as after:
        pass
    assert after == {}


@pytest.fixture(scope="module")
def smoke_train(tmp_path_factory):
    from instseg.data import register_coco_instances
    from instseg.data.smoke import make_smoke_dataset

    root = tmp_path_factory.mktemp("smoke_profile")
    paths = make_smoke_dataset(root, num_images={"train": 4}, image_size=(96, 128), splits=("train",))
    name = "profile_test_smoke_train"
    register_coco_instances(name, paths["train"]["json_file"], paths["train"]["image_root"])
    return name


CONFIGS = {
    "SparseInst": ("configs/sparseinst/R50_giam.yaml", ["MODEL.RESNETS.DEPTH", "18"]),
    "FastInst": ("configs/fastinst/R50_D3_640.yaml", ["MODEL.RESNETS.DEPTH", "18", "MODEL.FASTINST.NUM_OBJECT_QUERIES", "10"]),
    "FASSST": ("configs/fassst/MNv2_416.yaml", []),
    "QueryInst": ("configs/queryinst/R50_FPN_100q_1x.yaml",
                  ["MODEL.RESNETS.DEPTH", "18", "MODEL.QUERY_INST.NUM_PROPOSALS", "10",
                   "MODEL.QUERY_INST.NUM_STAGES", "2"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_profile_times_every_stage_and_each_models_matching(name, smoke_train):
    from pathlib import Path

    from instseg.config import setup_cfg
    from instseg.data import resolve_num_classes
    from instseg.engine.models import import_model_packages
    from instseg.engine.profile import PROFILE_STAGES, format_profile, profile_training

    import_model_packages()
    path, extra = CONFIGS[name]
    repo = Path(__file__).resolve().parents[1]
    cfg = setup_cfg(str(repo / path), extra + [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.NORM", "BN",
        "DATASETS.TRAIN", f"('{smoke_train}',)", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "DATALOADER.NUM_WORKERS", "0",
    ], freeze=False)
    resolve_num_classes(cfg)
    rep = profile_training(cfg, num_iter=2, num_warmup=1)
    assert rep["model"] == name and rep["num_iter"] == 2 and rep["batch_size"] == 2
    assert list(rep["stages"]) == list(PROFILE_STAGES)
    assert all(len(v) == 2 for v in rep["per_iter_ms"].values())
    assert sum(v["share"] for v in rep["stages"].values()) == pytest.approx(1.0, abs=1e-6)
    # every criterion marks its matching, and it is not counted twice in forward + loss
    assert rep["stages"]["matching"]["mean_ms"] > 0
    assert all(v["mean_ms"] > 0 for s, v in rep["stages"].items() if s != "data")
    table = format_profile(rep)
    assert "| matching |" in table and "| iteration |" in table and name in table.splitlines()[0]


def test_profile_rejects_bad_counts():
    from instseg.engine.profile import profile_training

    with pytest.raises(ValueError, match="num_iter >= 1"):
        profile_training(None, num_iter=0)
