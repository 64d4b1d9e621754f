"""Config errors name the chain of files (``_BASE_`` cycles, missing bases, YAML syntax) while
loading exactly as fvcore does; the one-time warning when an image has more ground-truth objects
than the model has predictions (issue 11, items 6 and 7)."""
import glob
import logging
import os
from pathlib import Path

import pytest
import torch
from fvcore.common.config import CfgNode as FvCfgNode
from scipy.optimize import linear_sum_assignment

from instseg.config import CfgNode, setup_cfg
from instseg.config.config import ConfigFileError
from instseg.modeling.matcher import hungarian
from instseg.modeling.matcher.hungarian import hungarian_assign, warn_if_more_targets_than_predictions

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------ loading: fvcore's semantics
def test_every_repo_config_loads_exactly_as_fvcore_loads_it():
    files = sorted(glob.glob(str(REPO / "configs/**/*.yaml"), recursive=True)
                   + glob.glob(str(REPO / "instseg/tools/configs/**/*.yaml"), recursive=True))
    assert len(files) > 50
    with_base = 0
    for f in files:
        ours = CfgNode.load_yaml_with_base(f)
        assert ours == FvCfgNode.load_yaml_with_base(f), f
        with_base += "_BASE_" in Path(f).read_text()
    assert with_base > 40  # the comparison covers inheritance, not only flat files


def test_base_semantics_relative_list_order_tilde_absolute_diamond(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _write(tmp_path / "home/h.yaml", "A: {X: home, H: 1}\n")
    _write(tmp_path / "abs.yaml", "A: {X: abs, ABS: 1}\nL: [1, 2]\n")
    _write(tmp_path / "cfg/common.yaml", "A: {X: common, C: 1}\n")
    _write(tmp_path / "cfg/sub/one.yaml", "_BASE_: ../common.yaml\nA: {X: one, ONE: 1}\n")
    _write(tmp_path / "cfg/sub/two.yaml", "_BASE_: ../common.yaml\nA: {X: two}\nL: [3]\n")
    top = _write(tmp_path / "cfg/top.yaml",
                 f"_BASE_: ['~/h.yaml', '{tmp_path / 'abs.yaml'}', sub/one.yaml, sub/two.yaml]\nA: {{TOP: 1}}\n")
    ours = CfgNode.load_yaml_with_base(str(top))
    assert ours == FvCfgNode.load_yaml_with_base(str(top))
    # later bases win, the file wins over its bases, mappings merge key by key, lists are replaced;
    # common.yaml is reached twice (a diamond), which is no cycle
    assert ours == {"A": {"X": "two", "H": 1, "ABS": 1, "C": 1, "ONE": 1, "TOP": 1}, "L": [3]}


def test_allow_unsafe_as_fvcore_and_a_clear_error_without_it(tmp_path):
    f = _write(tmp_path / "t.yaml", "A: !!python/tuple [1, 2]\n")
    assert CfgNode.load_yaml_with_base(str(f), allow_unsafe=True) == FvCfgNode.load_yaml_with_base(str(f), allow_unsafe=True) == {"A": (1, 2)}
    with pytest.raises(ConfigFileError, match=r"^Invalid YAML in .*t\.yaml, line 1, column 4: .*python/tuple.*allow_unsafe=True"):
        CfgNode.load_yaml_with_base(str(f))


# ------------------------------------------------------------------ the errors
def test_base_cycle_names_the_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "configs/a.yaml", "_BASE_: b.yaml\nSEED: 1\n")
    _write(tmp_path / "configs/b.yaml", "_BASE_: a.yaml\nSEED: 2\n")
    with pytest.raises(ConfigFileError) as e:
        setup_cfg("configs/a.yaml")
    assert str(e.value) == "configs/a.yaml -> configs/b.yaml -> configs/a.yaml: _BASE_ cycle"
    # a file including itself, and a cycle below the top file (the whole chain is named)
    _write(tmp_path / "configs/self.yaml", "_BASE_: self.yaml\n")
    with pytest.raises(ConfigFileError, match=r"^configs/self\.yaml -> configs/self\.yaml: _BASE_ cycle$"):
        setup_cfg("configs/self.yaml")
    _write(tmp_path / "configs/top.yaml", "_BASE_: [ok.yaml, sub/c.yaml]\n")
    _write(tmp_path / "configs/ok.yaml", "SEED: 3\n")
    _write(tmp_path / "configs/sub/c.yaml", "_BASE_: ../d.yaml\n")
    _write(tmp_path / "configs/d.yaml", "_BASE_: sub/c.yaml\n")
    with pytest.raises(ConfigFileError) as e:
        setup_cfg("configs/top.yaml")
    assert str(e.value) == "configs/top.yaml -> configs/sub/c.yaml -> configs/d.yaml -> configs/sub/c.yaml: _BASE_ cycle"


def test_missing_base_names_the_chain_and_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "configs/a.yaml", "_BASE_: b.yaml\n")
    _write(tmp_path / "configs/b.yaml", "_BASE_: x.yaml\n")
    with pytest.raises(FileNotFoundError) as e:
        setup_cfg("configs/a.yaml")
    assert str(e.value) == f"_BASE_ 'x.yaml' of configs/b.yaml (included from configs/a.yaml) not found: {tmp_path / 'configs/x.yaml'}"
    with pytest.raises(FileNotFoundError) as e:
        setup_cfg("configs/b.yaml")
    assert str(e.value) == f"_BASE_ 'x.yaml' of configs/b.yaml not found: {tmp_path / 'configs/x.yaml'}"
    with pytest.raises(FileNotFoundError, match=r"^Config file not found: configs/none\.yaml$"):
        setup_cfg("configs/none.yaml")


def test_yaml_syntax_error_names_file_line_and_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "configs/bad.yaml", "SEED: 1\nSOLVER:\n  BASE_LR: [0.1\n  MAX_ITER: 3\n")
    _write(tmp_path / "configs/inc.yaml", "_BASE_: bad.yaml\n")
    expected = "expected ',' or ']', but got ':' (while parsing a flow sequence from line 3, column 12)"
    with pytest.raises(ConfigFileError) as e:
        setup_cfg("configs/bad.yaml")
    assert str(e.value) == f"Invalid YAML in configs/bad.yaml, line 4, column 11: {expected}"
    with pytest.raises(ConfigFileError) as e:
        setup_cfg("configs/inc.yaml")
    assert str(e.value) == f"Invalid YAML in configs/bad.yaml, line 4, column 11 (included from configs/inc.yaml): {expected}"
    _write(tmp_path / "configs/empty.yaml", "")
    _write(tmp_path / "configs/list.yaml", "- 1\n")
    with pytest.raises(ConfigFileError, match=r"^configs/empty\.yaml: the top level .* mapping of keys, got NoneType \(the file is empty\)$"):
        setup_cfg("configs/empty.yaml")
    with pytest.raises(ConfigFileError, match=r"^configs/list\.yaml: .* got list$"):
        setup_cfg("configs/list.yaml")


def test_mapping_over_a_base_scalar_names_the_file(tmp_path):
    _write(tmp_path / "base.yaml", "A: 1\n")
    f = _write(tmp_path / "top.yaml", "_BASE_: base.yaml\nA: {B: 2}\n")
    with pytest.raises(AssertionError, match="Cannot inherit key 'A' from base!"):
        FvCfgNode.load_yaml_with_base(str(f))  # fvcore: a bare assertion
    with pytest.raises(ConfigFileError, match=r"Cannot inherit key 'A' from base! \(.*top\.yaml: a mapping cannot replace the base's int\)"):
        CfgNode.load_yaml_with_base(str(f))


# ------------------------------------------------------------------ more objects than queries
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_of_hungarian(monkeypatch):
    monkeypatch.setattr(hungarian, "_warned_more_targets", False)  # a fresh "process"
    h = _Records()
    hungarian.logger.addHandler(h)
    yield h.messages
    hungarian.logger.removeHandler(h)


def test_more_objects_than_queries_warns_once_and_changes_no_matching(warnings_of_hungarian):
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(100, 300, generator=g)  # 100 queries, 300 objects
    rows, cols = hungarian_assign(cost, name="test cost")
    ref_rows, ref_cols = linear_sum_assignment(cost.numpy())
    assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist() and len(rows) == 100
    assert warnings_of_hungarian == [
        "An image has 300 ground-truth objects but the model makes only 100 predictions to match them with "
        "(test cost): the 200 extra objects get no prediction and no loss. Raise the model's number of "
        "queries/proposals above the largest object count of the training images to train on all of them. "
        "(Warned once per process; later images are not reported.)"
    ]
    hungarian_assign(torch.rand(10, 50, generator=g))  # once per process
    assert len(warnings_of_hungarian) == 1


def test_no_warning_when_queries_suffice(warnings_of_hungarian):
    hungarian_assign(torch.rand(100, 100))
    hungarian_assign(torch.rand(300, 100))
    hungarian_assign(torch.rand(100, 0))
    assert warnings_of_hungarian == []
    assert warn_if_more_targets_than_predictions(5, 4) is True and warn_if_more_targets_than_predictions(5, 4) is False


def test_a_model_matcher_goes_through_the_shared_warning(warnings_of_hungarian):
    from sparseinst.matcher import DiceScoreMatcher

    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 100, 3, generator=g), "pred_masks": torch.randn(1, 100, 8, 8, generator=g)}
    targets = [{"labels": torch.randint(0, 3, (300,), generator=g), "masks": (torch.rand(300, 8, 8, generator=g) > 0.5).float()}]
    (src, tgt), = DiceScoreMatcher()(outputs, targets)
    assert len(src) == len(tgt) == 100
    assert len(warnings_of_hungarian) == 1 and warnings_of_hungarian[0].startswith(
        "An image has 300 ground-truth objects but the model makes only 100 predictions to match them with (dice-score matrix)")
