"""GPU-only checks (skipped without CUDA): AMP training steps stay finite, CUDA inference agrees
with CPU inference."""
from pathlib import Path

import pytest
import torch

import sparseinst  # noqa: F401
from instseg.config import setup_cfg
from instseg.modeling import build_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def _cfg(device, extra=()):
    return setup_cfg(str(REPO / "configs/sparseinst/R50_giam.yaml"), [
        "MODEL.NUM_CLASSES", "3", "MODEL.DEVICE", device, "MODEL.RESNETS.NORM", "BN", *extra])


def _batch():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 160, 224, dtype=torch.bool)
    masks[0, 10:80, 20:120] = True
    masks[1, 90:150, 100:200] = True
    return [{"image": torch.randint(0, 255, (3, 160, 224), dtype=torch.uint8, generator=g), "height": 160,
             "width": 224, "image_id": 1,
             "instances": {"labels": torch.tensor([0, 2]), "masks": masks, "boxes": torch.zeros(2, 4)}}]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_training_steps_are_finite(dtype):
    torch.manual_seed(0)
    model = build_model(_cfg("cuda")).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    for _ in range(5):
        with torch.autocast("cuda", dtype=dtype):
            losses = model(_batch())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(opt)
        scaler.update()


def test_cuda_inference_matches_cpu():
    torch.manual_seed(0)
    cpu = build_model(_cfg("cpu", ["MODEL.SPARSE_INST.CLS_THRESHOLD", "0.0"])).eval()
    gpu = build_model(_cfg("cuda", ["MODEL.SPARSE_INST.CLS_THRESHOLD", "0.0"])).eval()
    gpu.load_state_dict(cpu.state_dict())
    batch = [{k: v for k, v in _batch()[0].items() if k != "instances"}]
    with torch.no_grad():
        a, b = cpu(batch)[0], gpu(batch)[0]
    assert torch.allclose(a["scores"], b["scores"].cpu(), atol=1e-3)
    inter = (a["masks"] & b["masks"].cpu()).sum().item()
    union = (a["masks"] | b["masks"].cpu()).sum().item()
    assert union == 0 or inter / union > 0.99
