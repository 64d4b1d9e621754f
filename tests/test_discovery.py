"""Model discovery through the ``instseg.models`` entry points (instseg/discovery.py): get_cfg()'s
keys do not depend on prior imports, a broken model package raises with its name, the converter's
key tables come from the packages, and a fifth model outside the repository (``toyseg``, declared
by a ``*.dist-info/entry_points.txt`` only) trains with tools/train_net.py without editing instseg/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from instseg import discovery
from instseg.convert import ModelKeyTable, model_key_tables, register_key_table

REPO = Path(__file__).resolve().parents[1]
MODEL_NODES = {"MODEL.SPARSE_INST", "MODEL.FASTINST", "MODEL.QUERY_INST", "MODEL.FASSST"}


def _run(code: str, cwd=REPO, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ get_cfg in a fresh process
def test_get_cfg_keys_do_not_depend_on_what_was_imported_before(tmp_path):
    """``get_cfg()`` with nothing but instseg.config imported == after importing the four
    packages; both hold every model's node."""
    code = textwrap.dedent(
        """
        import json, sys
        from instseg.config import get_cfg
        names = ("sparseinst", "fastinst", "queryinst", "fassst")
        before = sorted(n for n in names if n in sys.modules)
        def flat(node, prefix=""):
            out = set()
            for k, v in node.items():
                out.add(prefix + k)
                if isinstance(v, dict):
                    out |= flat(v, prefix + k + ".")
            return out
        keys1 = flat(get_cfg())
        import sparseinst, fastinst, queryinst, fassst
        keys2 = flat(get_cfg())
        print("RESULT" + json.dumps({"before": before, "keys1": sorted(keys1), "keys2": sorted(keys2)}))
        """
    )
    proc = _run(code, cwd=tmp_path)  # not the repository: only the installed package is visible
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["before"] == []  # nothing of the models was imported before get_cfg()
    keys1, keys2 = set(out["keys1"]), set(out["keys2"])
    assert keys1 == keys2, (sorted(keys1 ^ keys2)[:20])
    assert MODEL_NODES <= keys1


def test_the_installed_distribution_declares_the_four_models():
    names = {ep.name: ep.value for ep in discovery.model_entry_points()}
    assert {"sparseinst", "fastinst", "queryinst", "fassst"} <= set(names), (
        f"{names}: run `pip install -e .` after editing setup.py's entry points")
    assert all(names[n] == n for n in ("sparseinst", "fastinst", "queryinst", "fassst"))


# ------------------------------------------------------------------ discovery itself (in-process)
class _FakeEntryPoint:
    """Duck-typed importlib.metadata.EntryPoint whose load() is counted."""

    def __init__(self, name, value, load):
        self.name, self.value, self._load, self.calls = name, value, load, 0

    def load(self):
        self.calls += 1
        return self._load()


@pytest.fixture
def fake_group(monkeypatch):
    """Replace the entry points of the group and a fresh discovery state; returns a setter."""
    monkeypatch.setattr(discovery, "_loaded", {})
    monkeypatch.setattr(discovery, "_done", False)
    eps = []

    class _Metadata:
        @staticmethod
        def entry_points(group):
            assert group == discovery.ENTRY_POINT_GROUP
            return list(eps)

    monkeypatch.setattr(discovery, "metadata", _Metadata)
    return eps


def test_each_entry_point_loads_once(fake_group):
    a = _FakeEntryPoint("a", "pkg_a", lambda: "module a")
    fake_group.append(a)
    assert discovery.discover_models() == ["a"]
    assert discovery.discover_models() == ["a"] and a.calls == 1
    b = _FakeEntryPoint("b", "pkg_b", lambda: "module b")
    fake_group.append(b)
    assert discovery.discover_models() == ["a"]  # cached: no new scan without refresh
    assert discovery.discover_models(refresh=True) == ["a", "b"]
    assert a.calls == 1 and b.calls == 1
    assert discovery.discovered_models() == {"a": "module a", "b": "module b"}


def test_duplicate_names_keep_the_first(fake_group, caplog):
    fake_group += [_FakeEntryPoint("a", "first", lambda: 1), _FakeEntryPoint("a", "second", lambda: 2)]
    assert discovery.discover_models() == ["a"]
    assert discovery.discovered_models() == {"a": 1}
    assert "declared twice" in caplog.text


def test_a_broken_model_package_raises_with_its_name(fake_group, tmp_path, monkeypatch):
    (tmp_path / "brokenseg_pkg.py").write_text("raise RuntimeError('boom: a dependency is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from importlib.metadata import EntryPoint

    fake_group.append(EntryPoint(name="brokenseg", value="brokenseg_pkg", group=discovery.ENTRY_POINT_GROUP))
    for _ in range(2):  # not remembered as done: raises every time
        with pytest.raises(discovery.ModelPackageImportError, match="brokenseg") as e:
            discovery.discover_models()
        assert "boom: a dependency is missing" in str(e.value) and "broken install" in str(e.value)
        assert isinstance(e.value.__cause__, RuntimeError) and e.value.model == "brokenseg"
    from instseg.config import get_cfg

    with pytest.raises(discovery.ModelPackageImportError, match="brokenseg"):
        get_cfg()
    # stale metadata whose module is gone is a broken install too, not a missing model
    fake_group[:] = [EntryPoint(name="goneseg", value="goneseg_no_such_module", group=discovery.ENTRY_POINT_GROUP)]
    with pytest.raises(discovery.ModelPackageImportError, match="goneseg"):
        discovery.discover_models()


def test_import_model_packages_loads_the_entry_points():
    from instseg.engine.models import import_model_packages

    names = import_model_packages()
    assert {"sparseinst", "fastinst", "queryinst", "fassst"} <= set(names)
    assert set(names) == set(discovery.discovered_models())


# ------------------------------------------------------------------ key tables
def test_key_tables_come_from_the_model_packages():
    tables = model_key_tables()
    assert {"sparseinst", "fastinst"} <= set(tables)
    import fastinst.convert
    import sparseinst.convert

    assert tables["sparseinst"] is sparseinst.convert.SPARSEINST_KEY_TABLE
    assert tables["fastinst"] is fastinst.convert.FASTINST_KEY_TABLE
    from instseg.tools.convert_official_weights import get_parser

    action = next(a for a in get_parser()._actions if a.dest == "model")
    assert list(action.choices) == sorted(model_key_tables())


def test_register_key_table_checks(monkeypatch):
    import instseg.convert as convert

    monkeypatch.setattr(convert, "MODEL_KEY_TABLES", dict(convert.MODEL_KEY_TABLES))
    t = ModelKeyTable(prefixes=(("head.", "head."),))
    assert register_key_table("ToyTable", t) is t and convert.MODEL_KEY_TABLES["toytable"] is t
    register_key_table("toytable", ModelKeyTable(prefixes=(("head.", "head."),)))  # equal: no-op
    with pytest.raises(ValueError, match="different key table"):
        register_key_table("toytable", ModelKeyTable(prefixes=(("x.", "y."),)))
    with pytest.raises(TypeError):
        register_key_table("other", {"prefixes": ()})
    out = convert.convert_official_state_dict({"head.w": __import__("torch").ones(2)}, "TOYTABLE")
    assert list(out) == ["head.w"]


# ------------------------------------------------------------------ a fifth model, outside the repository
TOYSEG = '''
"""A model package outside the repository: meta-architecture, config keys, key table."""
import torch
from torch import nn

from instseg.config import CfgNode as CN
from instseg.config import register_config_hook
from instseg.convert import ModelKeyTable, register_key_table
from instseg.modeling import META_ARCH_REGISTRY


@register_config_hook
def add_toyseg_config(cfg):
    if "TOYSEG" in cfg.MODEL:
        return
    cfg.MODEL.TOYSEG = CN()
    cfg.MODEL.TOYSEG.HIDDEN = 2
    cfg.MODEL.TOYSEG.TARGET = 1.0


register_key_table("toyseg", ModelKeyTable(prefixes=(("head.", "head."),)))


@META_ARCH_REGISTRY.register()
class ToySeg(nn.Module):
    """Training: a quadratic loss of the image mean. Eval: one full-image mask of class 0."""

    def __init__(self, cfg):
        super().__init__()
        self.target = float(cfg.MODEL.TOYSEG.TARGET)
        self.backbone = nn.Linear(1, cfg.MODEL.TOYSEG.HIDDEN)
        self.head = nn.Linear(cfg.MODEL.TOYSEG.HIDDEN, 1)

    def forward(self, batch):
        dev = self.head.weight.device
        x = torch.stack([b["image"].float().mean() / 255 for b in batch]).view(-1, 1).to(dev)
        if self.training:
            return {"loss_toy": (self.head(self.backbone(x)) - self.target).pow(2).mean()}
        outs = []
        for b in batch:
            h, w = int(b["height"]), int(b["width"])
            outs.append({"scores": torch.ones(1, device=dev), "labels": torch.zeros(1, dtype=torch.int64, device=dev),
                         "masks": torch.ones(1, h, w, dtype=torch.bool, device=dev),
                         "boxes": torch.tensor([[0.0, 0.0, float(w), float(h)]], device=dev)})
        return outs
'''


@pytest.fixture(scope="module")
def toyseg_site(tmp_path_factory):
    """A folder with the package ``toyseg`` and ``toyseg-0.1.dist-info`` declaring its entry point."""
    site = tmp_path_factory.mktemp("toyseg_site")
    (site / "toyseg").mkdir()
    (site / "toyseg" / "__init__.py").write_text(TOYSEG)
    info = site / "toyseg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyseg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[instseg.models]\ntoyseg = toyseg\n")
    return site


def _env_with(site):
    return {"PYTHONPATH": os.pathsep.join([str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}


def test_a_new_model_package_trains_with_train_net(toyseg_site, tmp_path):
    from instseg.data import make_smoke_dataset

    files = make_smoke_dataset(tmp_path / "data", num_images=2, image_size=(64, 64), splits=("train", "val"), image_format="png")
    out = tmp_path / "out"
    cfg_file = tmp_path / "toyseg.yaml"
    cfg_file.write_text(textwrap.dedent(f"""\
        MODEL:
          META_ARCHITECTURE: ToySeg
          DEVICE: cpu
          TOYSEG:
            TARGET: 2.0
        DATASETS:
          TRAIN: ("toy_train",)
          TEST: ("toy_val",)
        DATALOADER:
          NUM_WORKERS: 0
        INPUT:
          MIN_SIZE_TRAIN: (64,)
          MAX_SIZE_TRAIN: 64
          MIN_SIZE_TEST: 64
          MAX_SIZE_TEST: 64
        SOLVER:
          IMS_PER_BATCH: 1
          WARMUP_ITERS: 0
          STEPS: ()
          CHECKPOINT_PERIOD: 0
        SEED: 0
        LOG_PERIOD: 1
        OUTPUT_DIR: {out}
        """))
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(cfg_file),
           "--dataset", "toy_train", files["train"]["json_file"], files["train"]["image_root"],
           "--dataset", "toy_val", files["val"]["json_file"], files["val"]["image_root"],
           "SOLVER.MAX_ITER", "3", "MODEL.TOYSEG.HIDDEN", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **_env_with(toyseg_site))
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert (out / "model_final.ckpt").is_file()
    dumped = (out / "config.yaml").read_text()
    assert "META_ARCHITECTURE: ToySeg" in dumped and "TOYSEG:" in dumped
    assert "HIDDEN: 3" in dumped and "TARGET: 2.0" in dumped  # its own keys, from the file and the command line
    import torch

    ckpt = torch.load(out / "model_final.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    assert shapes["model.backbone.weight"] == (3, 1)  # built with MODEL.TOYSEG.HIDDEN 3
    assert "toy_val" in proc.stdout  # the final evaluation ran on its outputs


def test_a_new_model_package_is_found_by_build_model_and_the_converter(toyseg_site, tmp_path):
    """In a process that imports only instseg: build_model on a config read back from YAML (no
    get_cfg()), the converter's --model choices, get_cfg()'s keys."""
    code = textwrap.dedent(
        """
        import sys
        from instseg.config import CfgNode
        from instseg.modeling import build_model
        assert "toyseg" not in sys.modules
        cfg = CfgNode.load_cfg('''
        MODEL:
          META_ARCHITECTURE: ToySeg
          DEVICE: cpu
          NUM_CLASSES: 3
          TOYSEG:
            HIDDEN: 5
            TARGET: 1.0
        ''')
        model = build_model(cfg)
        assert type(model).__name__ == "ToySeg" and model.backbone.weight.shape == (5, 1)
        from instseg.config import get_cfg
        assert get_cfg().MODEL.TOYSEG.HIDDEN == 2
        from instseg.tools.convert_official_weights import get_parser
        choices = next(a for a in get_parser()._actions if a.dest == "model").choices
        assert "toyseg" in choices, choices
        from instseg.engine.models import import_model_packages
        assert "toyseg" in import_model_packages()
        print("OK")
        """
    )
    proc = _run(code, cwd=tmp_path, env_extra=_env_with(toyseg_site))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
