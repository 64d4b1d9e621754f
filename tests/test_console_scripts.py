"""The console scripts declared in setup.py (instseg-train, -eval, -benchmark, -quickstart,
-convert, -check-dataset, -demo, -export, -benchmark-zoo), their source-checkout wrappers tools/*.py, and the quickstart's packaged config."""
from __future__ import annotations

import ast
import fnmatch
import importlib
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"instseg-train", "instseg-eval", "instseg-benchmark", "instseg-quickstart", "instseg-convert",
            "instseg-check-dataset", "instseg-demo", "instseg-export", "instseg-benchmark-zoo"}
WRAPPERS = ["train_net.py", "eval_net.py", "benchmark_fps.py", "quickstart.py", "convert_official_weights.py",
            "check_dataset.py", "demo.py", "export_model.py", "benchmark_zoo.py"]


def _setup_kwargs() -> dict:
    """The literal keyword arguments of the ``setup(...)`` call in setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"]
    assert len(calls) == 1, "setup.py should call setup() once"
    out = {}
    for kw in calls[0].keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:  # not a literal (e.g. find_packages(...)): not needed here
            pass
    return out


def _console_scripts():
    scripts = {}
    for spec in _setup_kwargs()["entry_points"]["console_scripts"]:
        name, target = (s.strip() for s in spec.split("=", 1))
        module, func = target.split(":")
        scripts[name] = (module.strip(), func.strip())
    return scripts


def test_setup_declares_the_console_scripts():
    scripts = _console_scripts()
    assert set(scripts) == EXPECTED
    assert all(module.startswith("instseg.") for module, _ in scripts.values())  # installed code


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_console_script_target_help(name, capsys):
    module, func = _console_scripts()[name]
    target = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as e:
        target(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--" in out


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_source_checkout_wrapper_help(wrapper, monkeypatch, capsys):
    """``python tools/<wrapper> --help`` (README commands) runs the installed module's main."""
    path = REPO / "tools" / wrapper
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the wrapper prepends the repository
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(path), run_name="__main__")
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
    text = path.read_text()
    assert "from instseg.tools." in text and len(text.splitlines()) < 30  # thin: no logic of its own


def test_packaged_quickstart_config_is_shipped_and_matches_the_repository():
    """instseg-quickstart's default config (and its _BASE_ chain) is package data, and each copy
    merges to the same config as the repository's file (copy configs/ edits into instseg/tools/configs)."""
    pytest.importorskip("sparseinst")  # registers the MODEL.SPARSE_INST keys
    from instseg.config import setup_cfg
    from instseg.tools.quickstart import DEFAULT_CONFIG, default_config_file

    packaged_root = REPO / "instseg" / "tools" / "configs"
    default = Path(default_config_file())
    assert default.is_file() and default == (packaged_root / DEFAULT_CONFIG).resolve()
    patterns = _setup_kwargs()["package_data"]["instseg.tools"]
    copies = sorted(packaged_root.rglob("*.yaml"))
    assert {c.relative_to(packaged_root).as_posix() for c in copies} == {
        "Base-SparseInst.yaml", "sparseinst/R50_giam.yaml", "sparseinst/smoke_R50_scratch.yaml",
        "sparseinst/quickstart_R18.yaml"}
    for copy in copies:
        rel = copy.relative_to(packaged_root.parent).as_posix()  # relative to instseg/tools
        assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel
        repo_file = REPO / "configs" / copy.relative_to(packaged_root)
        assert setup_cfg(str(copy)) == setup_cfg(str(repo_file)), (
            f"{copy} differs from {repo_file}: copy the repository's file into instseg/tools/configs/")


def test_quickstart_missing_config_names_the_file_and_the_flag(capsys):
    from instseg.tools.quickstart import run

    with pytest.raises(SystemExit) as e:
        run(["--config-file", "/nonexistent/quick.yaml"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "/nonexistent/quick.yaml" in err and "--config-file" in err


def test_quickstart_reads_results_keyed_by_dataset_and_the_old_flat_form():
    from instseg.tools.quickstart import results_by_dataset

    metrics = {"segm": {"AP": 12.5, "AP50": 30.0}, "bbox": {"AP": 10.0}}
    assert results_by_dataset({"val_a": metrics, "val_b": metrics}, "x") == {"val_a": metrics, "val_b": metrics}
    assert results_by_dataset(metrics, "smoke_shapes_val") == {"smoke_shapes_val": metrics}  # old engine
    assert results_by_dataset({"segm": metrics}, "x") == {"segm": metrics}  # a dataset named "segm"
    assert results_by_dataset({}, "x") == {} and results_by_dataset(None, "x") == {}


def test_quickstart_into_an_earlier_runs_folder_stops_before_writing_unless_overwrite(tmp_path, monkeypatch):
    """A second quick start into the same OUTPUT_DIR is refused before anything is written (no
    log.txt, no config); with --overwrite it goes on and train() is asked to replace the old run."""
    import instseg.engine as engine
    from instseg.engine.launch import OutputDirInUseError
    from instseg.tools.quickstart import run

    out = tmp_path / "qs"
    out.mkdir()
    (out / "model_final.ckpt").write_bytes(b"earlier run")
    with pytest.raises(OutputDirInUseError, match="--overwrite"):
        run(["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["model_final.ckpt"]

    calls = {}

    class _Stop(Exception):
        pass

    def fake_train(cfg, **kw):
        calls.update(kw)
        raise _Stop

    monkeypatch.setattr(engine, "train", fake_train)
    with pytest.raises(_Stop):
        run(["--overwrite", "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "1"])
    assert calls == {"overwrite": True}
    assert (out / "config.yaml").is_file()
