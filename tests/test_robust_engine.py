"""Robust engine (issue 11): strict evaluation, safe output folders, checkpoint housekeeping
(stale temporary files, ``last.ckpt`` a link, keep-last-N, redone steps, write errors, damaged
``last.ckpt``), ``--config-file`` required, fatal errors in ``log.txt``.

The tools run in-process (``instseg.tools.train_net.run`` / ``eval_net.run``) on a model of a few
scalars and a generated 3-image dataset (64x64), so each training is a fraction of a second.
"""
from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest
import torch

from instseg.checkpoint import IncompleteWeightsError
from instseg.data import DatasetCatalog, MetadataCatalog, make_smoke_dataset
from instseg.engine.callbacks import AtomicCheckpointIO, CheckpointWriteError, sweep_temporary_checkpoints
from instseg.engine.launch import OutputDirInUseError, ResumeError, find_resume_checkpoint
from instseg.modeling.registry import META_ARCH_REGISTRY
from instseg.tools import eval_net, train_net


class _RobustTinyArch(torch.nn.Module):
    """A scalar "backbone" and a per-class "head" (``MODEL.NUM_CLASSES`` outputs). Training: a
    quadratic loss of the image mean; evaluation: no detections."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = torch.nn.Linear(1, 1)
        self.head = torch.nn.Linear(1, int(cfg.MODEL.NUM_CLASSES))

    def forward(self, batch):
        if self.training:
            x = torch.stack([b["image"].float().mean() / 255 for b in batch]).view(-1, 1)
            return {"loss_tiny": (self.head(self.backbone(x)) - 3).pow(2).mean()}
        return [{"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                 "masks": torch.zeros(0, b["height"], b["width"], dtype=torch.bool)} for b in batch]


class _RobustOtherFamilyArch(_RobustTinyArch):
    """Another "model family": the same kind of model under other tensor names."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.encoder, self.decoder = self.backbone, self.head
        del self.backbone, self.head


class _RobustR18Arch(_RobustTinyArch):
    """A torchvision ResNet-18 as ``backbone.body`` (what ImageNet files are loaded into)."""

    def __init__(self, cfg):
        import torchvision

        super().__init__(cfg)
        self.backbone = torch.nn.Module()
        self.backbone.body = torchvision.models.resnet18()


for _cls in (_RobustTinyArch, _RobustOtherFamilyArch, _RobustR18Arch):
    if _cls.__name__ not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_cls)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(json_file, image_root) of a generated 3-image dataset (3 classes)."""
    root = tmp_path_factory.mktemp("robust_set")
    files = make_smoke_dataset(root, num_images=3, image_size=(64, 64), splits=("a",), image_format="png")
    return files["a"]["json_file"], files["a"]["image_root"]


@pytest.fixture
def ds(smoke):
    """A fresh dataset name per test (the catalog is global), removed afterwards."""
    name = f"robust_{uuid.uuid4().hex[:8]}"
    yield name
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog:
            catalog.remove(name)


def _config(tmp_path: Path, arch: str = "_RobustTinyArch") -> str:
    path = tmp_path / f"{arch}.yaml"
    path.write_text(
        f"MODEL:\n  META_ARCHITECTURE: {arch}\n  DEVICE: cpu\n"
        "DATALOADER:\n  NUM_WORKERS: 0\n"
        "INPUT:\n  MIN_SIZE_TRAIN: (64,)\n  MAX_SIZE_TRAIN: 64\n  MIN_SIZE_TEST: 64\n  MAX_SIZE_TEST: 64\n"
        "SOLVER:\n  IMS_PER_BATCH: 1\n  WARMUP_ITERS: 0\n  STEPS: ()\n  BASE_LR: 0.01\n"
        "SEED: 0\nLOG_PERIOD: 1\n"
    )
    return str(path)


def _args(tmp_path, smoke, ds, out, *opts, flags=(), arch="_RobustTinyArch", train=True):
    sets = ["DATASETS.TRAIN", f"('{ds}',)" if train else "()", "DATASETS.TEST", "()" if train else f"('{ds}',)"]
    return [*flags, "--config-file", _config(tmp_path, arch), "--dataset", ds, *smoke, *sets, "OUTPUT_DIR", str(out), *opts]


def _fresh_log_files():
    """Close the log files earlier in-process runs opened (as a new process starts without them)."""
    import logging

    root = logging.getLogger("instseg")
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()


@pytest.fixture(autouse=True)
def _close_log_files():
    _fresh_log_files()
    yield
    _fresh_log_files()


def _train(tmp_path, smoke, ds, out, max_iter, *opts, flags=()):
    _fresh_log_files()
    return train_net.run(_args(tmp_path, smoke, ds, out, "SOLVER.MAX_ITER", str(max_iter), *opts, flags=flags))


def _files(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.is_file() or p.is_symlink())


def _save_model(arch_cls, num_classes, path):
    from instseg.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.NUM_CLASSES = num_classes
    torch.save(arch_cls(cfg).state_dict(), path)
    return str(path)


# ------------------------------------------------------------------ strict evaluation
def test_eval_of_another_model_family_is_an_error_listing_the_tensors(tmp_path, smoke, ds):
    weights = _save_model(_RobustOtherFamilyArch, 3, tmp_path / "other.pth")
    out = tmp_path / "eval"
    with pytest.raises(IncompleteWeightsError) as e:
        eval_net.run(_args(tmp_path, smoke, ds, out, "MODEL.WEIGHTS", weights, train=False))
    msg = str(e.value)
    assert "0 of 4 model tensors loaded" in msg and "evaluating it would score a partly random model" in msg
    assert "4 missing" in msg and "backbone.weight" in msg and "head.bias" in msg
    assert "4 unexpected" in msg and "encoder.weight" in msg and "decoder.bias" in msg
    assert "--allow-partial-weights" in msg and "_RobustTinyArch" in msg
    assert not (out / "metrics.json").exists()
    # the whole list and the traceback are in log.txt too
    log = (out / "log.txt").read_text()
    assert "Traceback" in log and "IncompleteWeightsError" in log and "decoder.weight" in log
    # the flag evaluates them anyway
    res = eval_net.run(["--allow-partial-weights"] + _args(tmp_path, smoke, ds, out, "MODEL.WEIGHTS", weights, train=False))
    assert list(res) == [ds] and (out / "metrics.json").is_file()


def test_eval_with_another_class_count_is_an_error_also_with_eval_only(tmp_path, smoke, ds):
    weights = _save_model(_RobustTinyArch, 7, tmp_path / "seven.pth")  # the dataset has 3 classes
    for tool, flags in ((eval_net, []), (train_net, ["--eval-only"])):
        with pytest.raises(IncompleteWeightsError) as e:
            tool.run(flags + _args(tmp_path, smoke, ds, tmp_path / tool.__name__, "MODEL.WEIGHTS", weights, train=False))
        msg = str(e.value)
        assert "2 of 4 model tensors loaded" in msg and "MODEL.NUM_CLASSES 3" in msg
        assert "head.weight (7, 1) in the file vs (3, 1) in the model" in msg and "head.bias (7,)" in msg
        assert "missing" not in msg and "unexpected" not in msg


def test_eval_of_an_imagenet_file_is_a_partial_model(tmp_path, smoke, ds):
    import torchvision

    weights = tmp_path / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    with pytest.raises(IncompleteWeightsError) as e:
        eval_net.run(_args(tmp_path, smoke, ds, tmp_path / "ev", "MODEL.WEIGHTS", str(weights), arch="_RobustR18Arch", train=False))
    msg = str(e.value)
    assert "100 of 104 model tensors loaded (an ImageNet classification file: backbone only)" in msg and "4 missing" in msg
    assert "missing" in msg and "head.weight" in msg and "backbone.body.conv1.weight" not in msg.split("missing")[1]


def test_complete_weights_evaluate_and_bn_counters_do_not_count(tmp_path, smoke, ds):
    weights = tmp_path / "r18.pth"
    from instseg.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.NUM_CLASSES = 3
    sd = {k: v for k, v in _RobustR18Arch(cfg).state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, weights)
    res = eval_net.run(_args(tmp_path, smoke, ds, tmp_path / "ev", "MODEL.WEIGHTS", str(weights), arch="_RobustR18Arch", train=False))
    assert list(res) == [ds]
    assert "Loaded %s: all " % weights in (tmp_path / "ev" / "log.txt").read_text()


def test_fine_tuning_keeps_tolerant_loading_and_logs_the_same_list(tmp_path, smoke, ds):
    weights = _save_model(_RobustTinyArch, 7, tmp_path / "seven.pth")
    out = tmp_path / "ft"
    _train(tmp_path, smoke, ds, out, 1, "MODEL.WEIGHTS", weights, "SOLVER.CHECKPOINT_PERIOD", "0")
    log = (out / "log.txt").read_text()
    assert "Fine-tuning from weights that do not fill the model of this config" in log
    assert "head.weight (7, 1) in the file vs (3, 1) in the model" in log
    assert (out / "model_final.ckpt").is_file()


# ------------------------------------------------------------------ safe output folders
def test_new_run_into_a_finished_output_dir_stops_before_writing(tmp_path, smoke, ds):
    out = tmp_path / "run"
    _train(tmp_path, smoke, ds, out, 2, "SOLVER.CHECKPOINT_PERIOD", "1")
    before = {n: (out / n).stat().st_mtime_ns for n in _files(out)}
    log_size = (out / "log.txt").stat().st_size
    with pytest.raises(OutputDirInUseError) as e:
        _train(tmp_path, smoke, ds, out, 2, "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "5")
    msg = str(e.value)
    assert f"OUTPUT_DIR {out} holds checkpoints of another run" in msg and "model_final.ckpt" in msg
    assert "--resume" in msg and "new OUTPUT_DIR" in msg and "--overwrite" in msg
    assert {n: (out / n).stat().st_mtime_ns for n in _files(out)} == before  # nothing written
    assert (out / "log.txt").stat().st_size == log_size

    # --overwrite: the old checkpoints are replaced cleanly, config.yaml is this run's
    _train(tmp_path, smoke, ds, out, 2, "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "5", flags=["--overwrite"])
    names = _files(out)
    assert not [n for n in names if "-v" in n or n.startswith(".tmp-")], names
    assert "SEED: 5" in (out / "config.yaml").read_text()
    assert torch.load(out / "model_final.ckpt", weights_only=False)["global_step"] == 2

    # --resume with another config: config.yaml of the run is kept, the new one written beside it
    _train(tmp_path, smoke, ds, out, 3, "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "5", flags=["--resume"])
    assert "MAX_ITER: 2" in (out / "config.yaml").read_text()
    extra = [n for n in _files(out) if n.startswith("config.") and n != "config.yaml"]
    assert len(extra) == 1 and "MAX_ITER: 3" in (out / extra[0]).read_text()
    assert "SOLVER.MAX_ITER" in (out / "log.txt").read_text().split("differs from this run's config")[1].splitlines()[0]

    # evaluation into the training folder still works
    weights = str(out / "model_final.ckpt")
    res = eval_net.run(_args(tmp_path, smoke, ds, out, "MODEL.WEIGHTS", weights, train=False))
    assert list(res) == [ds] and (out / "metrics.json").is_file()
    with pytest.raises(SystemExit):  # --resume and --overwrite exclude each other
        train_net.run(["--resume", "--overwrite"] + _args(tmp_path, smoke, ds, out))


# ------------------------------------------------------------------ checkpoint housekeeping
def test_checkpoint_housekeeping_link_keep_last_sweep_and_redone_step(tmp_path, smoke, ds, monkeypatch):
    out = tmp_path / "hk"
    writes = []
    save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        writes.append((os.path.basename(path), os.path.getsize(path)))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    keep = ["SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.CHECKPOINT_KEEP_LAST", "2"]
    _train(tmp_path, smoke, ds, out, 4, *keep)
    # one full write per period (no copy as last.ckpt), then model_final
    assert [w for w, _ in writes] == ["model_0000001.ckpt", "model_0000002.ckpt", "model_0000003.ckpt",
                                      "model_0000004.ckpt", "model_final.ckpt"]
    assert [n for n in _files(out) if n.endswith(".ckpt")] == ["last.ckpt", "model_0000003.ckpt", "model_0000004.ckpt",
                                                              "model_final.ckpt"]
    assert os.path.islink(out / "last.ckpt") and os.readlink(out / "last.ckpt") == "model_0000004.ckpt"
    assert torch.load(out / "last.ckpt", weights_only=False)["global_step"] == 4

    # as if killed mid-write and after model_0000004 was written but before last.ckpt moved:
    (out / ".tmp-killed.ckpt").write_bytes(b"\0" * 1000)
    os.remove(out / "last.ckpt")
    os.symlink("model_0000003.ckpt", out / "last.ckpt")
    os.remove(out / "model_final.ckpt")
    first_4 = torch.load(out / "model_0000004.ckpt", weights_only=False)["state_dict"]
    writes.clear()
    _train(tmp_path, smoke, ds, out, 5, *keep, flags=["--resume"])
    assert [w for w, _ in writes] == ["model_0000004.ckpt", "model_0000005.ckpt", "model_final.ckpt"]
    names = [n for n in _files(out) if n.endswith(".ckpt")]
    assert names == ["last.ckpt", "model_0000004.ckpt", "model_0000005.ckpt", "model_final.ckpt"], names  # no -v1, no .tmp
    assert os.readlink(out / "last.ckpt") == "model_0000005.ckpt"
    redone = torch.load(out / "model_0000004.ckpt", weights_only=False)
    assert redone["global_step"] == 4
    for k, v in first_4.items():  # the redone step is the same step (resume is exact)
        assert torch.equal(v, redone["state_dict"][k]), k
    assert "Removed 1 temporary checkpoint file(s)" in (out / "log.txt").read_text()


def test_sweep_removes_only_temporary_files(tmp_path):
    for n in (".tmp-a.ckpt", ".tmp-link-b.ckpt", "model_0000001.ckpt", "last.ckpt", ".tmp-notes.txt"):
        (tmp_path / n).write_bytes(b"x")
    removed = sweep_temporary_checkpoints(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [".tmp-a.ckpt", ".tmp-link-b.ckpt"]
    assert _files(tmp_path) == [".tmp-notes.txt", "last.ckpt", "model_0000001.ckpt"]
    assert sweep_temporary_checkpoints(str(tmp_path / "absent")) == []


def test_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "model_0000002.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as e:
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert f"could not write checkpoint {path}: OSError: [Errno 28] No space left on device" in str(e.value)
    assert "MiB free in" in str(e.value) and "--resume" in str(e.value)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1
    assert _files(tmp_path) == ["model_0000002.ckpt"]  # no temporary file left

    # torch's zip writer reports a full disk as a RuntimeError naming no file: wrapped the same way
    def zip_writer_full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", zip_writer_full)
    with pytest.raises(CheckpointWriteError, match=f"could not write checkpoint {path}: RuntimeError"):
        io.save_checkpoint({"step": 3}, path)


def test_write_error_during_training_stops_with_the_path_in_log_txt(tmp_path, smoke, ds, monkeypatch):
    out = tmp_path / "full"
    real_save, calls = torch.save, []

    def save_then_full(obj, f, *a, **k):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_full)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*model_0000002\.ckpt"):
        _train(tmp_path, smoke, ds, out, 3, "SOLVER.CHECKPOINT_PERIOD", "1")
    monkeypatch.undo()
    assert [n for n in _files(out) if n.endswith(".ckpt")] == ["last.ckpt", "model_0000001.ckpt"]
    assert torch.load(out / "last.ckpt", weights_only=False)["global_step"] == 1
    log = (out / "log.txt").read_text()
    assert "Fatal error, the run stops: CheckpointWriteError" in log and "Traceback" in log and "model_0000002.ckpt" in log


def test_resume_with_a_damaged_last_ckpt_falls_back_and_names_it(tmp_path, smoke, ds):
    out = tmp_path / "dmg"
    _train(tmp_path, smoke, ds, out, 3, "SOLVER.CHECKPOINT_PERIOD", "1")
    os.remove(out / "model_final.ckpt")
    data = (out / "model_0000003.ckpt").read_bytes()
    (out / "model_0000003.ckpt").write_bytes(data[: len(data) // 3])  # last.ckpt links to it: truncated
    path, step = find_resume_checkpoint(str(out))
    assert (path, step) == (str(out / "model_0000002.ckpt"), 2)
    _train(tmp_path, smoke, ds, out, 4, "SOLVER.CHECKPOINT_PERIOD", "1", flags=["--resume"])
    log = (out / "log.txt").read_text()
    assert f"--resume: {out / 'last.ckpt'} is damaged (truncated or corrupt, {len(data) // 3} bytes: " in log
    assert "falling back to the newest periodic checkpoint that loads" in log
    assert f"Resuming from {out / 'model_0000002.ckpt'} at iteration 2" in log
    assert torch.load(out / "model_final.ckpt", weights_only=False)["global_step"] == 4
    assert torch.load(out / "model_0000003.ckpt", weights_only=False)["global_step"] == 3  # redone, intact again

    # nothing loads: a clear error naming each file
    for n in ("model_0000001.ckpt", "model_0000002.ckpt", "model_0000003.ckpt", "model_0000004.ckpt", "model_final.ckpt"):
        if (out / n).exists():
            (out / n).write_bytes(b"garbage")
    with pytest.raises(ResumeError) as e:
        find_resume_checkpoint(str(out))
    msg = str(e.value)
    assert f"--resume: no checkpoint in {out} can be loaded" in msg and "last.ckpt" in msg and "model_final.ckpt" in msg
    # a dangling last.ckpt (its target removed) is named as such
    os.remove(out / "last.ckpt")
    os.symlink("model_0000009.ckpt", out / "last.ckpt")
    with pytest.raises(ResumeError, match="a link to the missing file model_0000009.ckpt"):
        find_resume_checkpoint(str(out))


# ------------------------------------------------------------------ config file, fatal errors
@pytest.mark.parametrize("tool", [train_net, eval_net])
def test_missing_config_file_is_an_error(tool, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tool.run(["OUTPUT_DIR", str(tmp_path / "o"), "MODEL.WEIGHTS", "w.pth"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--config-file is required" in err and "FrozenBN ResNet-50 with random weights" in err and "cannot train" in err
    assert not (tmp_path / "o").exists()


def test_fatal_error_goes_to_log_txt_with_traceback(tmp_path, smoke, ds):
    out = tmp_path / "fatal"
    with pytest.raises(ValueError, match="NOPE"):
        _train(tmp_path, smoke, ds, out, 2, "SOLVER.OPTIMIZER", "NOPE")
    log = (out / "log.txt").read_text()
    assert "Fatal error, the run stops: ValueError" in log and "Traceback (most recent call last)" in log and "NOPE" in log
    # an error before OUTPUT_DIR exists (unknown config key) writes nothing there
    out2 = tmp_path / "early"
    with pytest.raises(KeyError):
        _train(tmp_path, smoke, ds, out2, 2, "SOLVER.NOT_A_KEY", "1")
    assert not out2.exists()


def test_eval_channels_last_and_bf16_flags_reach_the_model(tmp_path, smoke, ds, monkeypatch):
    """--channels-last: the model's 4-D weights are channels_last during validation, and the AP is
    that of the default layout; --bf16: validation runs under CPU bfloat16 autocast."""
    from instseg.config import get_cfg
    from instseg.engine.module import InstSegModule

    weights = tmp_path / "r18.pth"
    cfg = get_cfg()
    cfg.MODEL.NUM_CLASSES = 3
    torch.save({k: v for k, v in _RobustR18Arch(cfg).state_dict().items() if not k.endswith("num_batches_tracked")},
               weights)
    seen = []
    real = InstSegModule.validation_step

    def spy(self, *a, **k):
        conv = next(p for p in self.model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
        seen.append((conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous(),
                     torch.is_autocast_enabled("cpu")))
        return real(self, *a, **k)

    monkeypatch.setattr(InstSegModule, "validation_step", spy)
    base = eval_net.run(_args(tmp_path, smoke, ds, tmp_path / "a", "MODEL.WEIGHTS", str(weights), arch="_RobustR18Arch", train=False))
    assert seen and not any(cl or ac for cl, ac in seen)
    seen.clear()
    cl = eval_net.run(["--channels-last"] + _args(tmp_path, smoke, ds, tmp_path / "b", "MODEL.WEIGHTS", str(weights),
                                                  arch="_RobustR18Arch", train=False))
    assert seen and all(c and not ac for c, ac in seen)
    for task in base[ds]:
        for key, v in base[ds][task].items():
            assert cl[ds][task][key] == pytest.approx(v, abs=1e-6, nan_ok=True), (task, key)
    seen.clear()
    eval_net.run(["--bf16"] + _args(tmp_path, smoke, ds, tmp_path / "c", "MODEL.WEIGHTS", str(weights),
                                    arch="_RobustR18Arch", train=False))
    assert seen and all(ac and not c for c, ac in seen)
