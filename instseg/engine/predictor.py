"""Single-call inference on images: :class:`Predictor` (the counterpart of Detectron2's
``DefaultPredictor``, ``detectron2/engine/defaults.py``).

The predictor builds ``MODEL.META_ARCHITECTURE`` from a config, loads ``MODEL.WEIGHTS`` strictly
(every tensor of the model, with the model's shape: the rule of ``tools/eval_net.py``), and turns
an image (a numpy array or a file) into the model output of the data contract
(docs/architecture.md, "Data contract") at the image's original size. The image is resized with
the test mapper's own transform (:func:`instseg.data.transforms.build_augmentation` with
``is_train=False``, held by :class:`instseg.data.DatasetMapper`), so a predictor sees what
evaluation sees.

    from instseg.engine import Predictor
    predictor = Predictor.from_config_file("configs/sparseinst/R50_giam.yaml", weights="model_final.ckpt")
    out = predictor("image.jpg")              # {"scores", "labels", "masks", "boxes"} on the CPU
    outs = predictor([bgr_frame_1, bgr_frame_2], format="BGR")   # a batch: a list of dicts
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Sequence, Union

import numpy as np
import torch
from torchvision import tv_tensors

__all__ = ["Predictor", "ImageInput"]

logger = logging.getLogger("instseg.predictor")

#: What :meth:`Predictor.__call__` accepts for one image.
ImageInput = Union[np.ndarray, str, "os.PathLike[str]"]

_FORMATS = ("RGB", "BGR")


def _to_cpu(x: Any) -> Any:
    """``x`` with every tensor (also inside dicts, lists and tuples) moved to the CPU."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


class Predictor:
    """A model built from ``cfg``, its weights loaded, ready for ``predictor(image)``.

    Args:
        cfg: a config (:func:`instseg.config.setup_cfg`) with ``MODEL.NUM_CLASSES`` resolved (> 0;
            :meth:`from_config_file` resolves it from the datasets). It is cloned and frozen;
            ``MODEL.DEVICE`` is the device the model runs on.
        weights: the weights file; ``None`` (default) takes ``cfg.MODEL.WEIGHTS``. ``""`` means
            random initialization, refused unless ``allow_random``.
        allow_random: allow empty weights (random initialization: for tests and the demo's
            ``--random-weights``; the outputs mean nothing). The initialization is drawn from
            ``cfg.SEED`` (0 when negative) in a forked torch RNG: the same config gives the same
            model, and the caller's random state is left as it was.
        allow_partial_weights: load weights that do not fill the model (missing, unexpected or
            shape-mismatched tensors are then listed in a warning), as ``--allow-partial-weights``
            of ``tools/eval_net.py``.

    Attributes:
        cfg: the frozen config clone. model: the ``nn.Module`` in eval mode on ``MODEL.DEVICE``.
        weights: the loaded file (``""``: random). augmentation: the test-time transform of
        :class:`instseg.data.DatasetMapper` (``is_train=False``).

    Raises:
        ValueError: the weights are empty and ``allow_random`` is false; ``MODEL.NUM_CLASSES`` is
            not resolved (< 1); ``INPUT.FORMAT`` is not RGB (:class:`~instseg.data.DatasetMapper`).
        FileNotFoundError: the weights file does not exist (``"Weights file not found: <path>"``).
        instseg.checkpoint.IncompleteWeightsError: (a ``ValueError``) the weights do not fill the
            model and ``allow_partial_weights`` is false (the tensors are listed).
    """

    def __init__(self, cfg, weights: str | None = None, allow_random: bool = False,
                 allow_partial_weights: bool = False) -> None:
        from ..checkpoint import check_complete_load, describe_load_report, is_complete_load, load_checkpoint
        from ..data import DatasetMapper
        from ..modeling import build_model

        cfg = cfg.clone()
        cfg.defrost()
        weights = str(cfg.MODEL.WEIGHTS if weights is None else weights)
        if not weights and not allow_random:
            raise ValueError(
                "No weights: MODEL.WEIGHTS is empty and no weights file was given; pass a checkpoint "
                "(MODEL.WEIGHTS W, weights=W) or allow_random=True (demo: --random-weights) for a "
                "randomly initialized model"
            )
        if weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"Weights file not found: {weights}")
        if int(cfg.MODEL.NUM_CLASSES) < 1:
            raise ValueError(
                f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}: set it, or name a dataset in DATASETS.TRAIN/TEST "
                "(Predictor.from_config_file resolves it from the dataset's categories)"
            )
        cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
        self.cfg = cfg
        self.weights = weights
        if weights:
            self.model = build_model(cfg)  # on MODEL.DEVICE
        else:
            # random initialization, reproducible: drawn from SEED (0 when negative) without
            # touching the caller's random state
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(cfg.SEED) if int(cfg.SEED) >= 0 else 0)
                self.model = build_model(cfg)
        if weights:
            report = load_checkpoint(self.model, weights)
            what = f"the model of this config ({cfg.MODEL.META_ARCHITECTURE}, MODEL.NUM_CLASSES {cfg.MODEL.NUM_CLASSES})"
            if not is_complete_load(report):
                if not allow_partial_weights:
                    check_complete_load(report, weights, what)
                logger.warning("Predicting with weights that do not fill %s:\n%s", what,
                               describe_load_report(report, weights, limit=0))
        else:
            logger.warning("Predictor with random weights (%s): its outputs are meaningless", cfg.MODEL.META_ARCHITECTURE)
        self.model.eval()
        # The test mapper's transform: the resize every evaluation applies (every mapper's test
        # mode, instance, semantic and panoptic, runs this DatasetMapper).
        self.augmentation = DatasetMapper(cfg, is_train=False).augmentation

    @classmethod
    def from_config_file(cls, config_file: str, opts: Sequence[str] = (), weights: str | None = None,
                         **kwargs) -> "Predictor":
        """A predictor for ``config_file`` with the ``KEY VALUE`` overrides ``opts``, as the tools
        read a config: the model packages are loaded, ``MODEL.NUM_CLASSES`` is taken from the
        datasets (:func:`instseg.data.resolve_num_classes`) and ``MODEL.DEVICE`` defaults to
        ``cuda`` when a GPU is visible.

        Args:
            config_file: a YAML config (e.g. ``configs/sparseinst/R50_giam.yaml``).
            opts: overrides, ``["MODEL.WEIGHTS", "w.ckpt", ...]``.
            weights: overrides ``MODEL.WEIGHTS`` when given.
            **kwargs: ``allow_random``, ``allow_partial_weights`` (see :class:`Predictor`).

        Raises:
            FileNotFoundError: no config file, or no weights file (named).
            KeyError: an unknown config key (named).
            ValueError: see :class:`Predictor` and :func:`instseg.data.resolve_num_classes`.
        """
        from ..config import setup_cfg
        from ..data import resolve_num_classes
        from .models import import_model_packages

        import_model_packages()
        cfg = setup_cfg(config_file, list(opts or ()), freeze=False)
        resolve_num_classes(cfg)
        return cls(cfg, weights=weights, **kwargs)

    def preprocess(self, image: ImageInput, format: str = "RGB") -> Dict[str, Any]:
        """One image -> the model input dict of the test mapper.

        Args:
            image: ``uint8 (H, W, 3)`` array in ``format`` channel order, or the path of an image
                file (read with :func:`instseg.data.read_image`, always RGB: ``format`` does not
                apply).
            format: ``"RGB"`` or ``"BGR"`` (OpenCV's order, e.g. ``cv2.imread`` / video frames).

        Returns:
            ``{"image": uint8 (3, h, w) RGB resized by the test transform, "height": H, "width": W}``
            (``"file_name"`` too for a path).

        Raises:
            ValueError: ``format`` is not RGB/BGR; the array is not ``uint8 (H, W, 3)``.
            TypeError: ``image`` is neither an array nor a path.
            FileNotFoundError, instseg.data.ImageDecodeError: the file is missing or unreadable
                (the message names it).
        """
        from ..data import read_image

        fmt = str(format).upper()
        if fmt not in _FORMATS:
            raise ValueError(f"format must be 'RGB' or 'BGR', got {format!r}")
        extra: Dict[str, Any] = {}
        if isinstance(image, (str, os.PathLike)):
            extra["file_name"] = os.fspath(image)
            rgb = read_image(os.fspath(image))
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
                raise ValueError(
                    f"expected a uint8 (H, W, 3) image array, got dtype {image.dtype} and shape {tuple(image.shape)}"
                )
            rgb = image[:, :, ::-1] if fmt == "BGR" else image
        else:
            raise TypeError(f"expected a uint8 (H, W, 3) numpy array or an image path, got {type(image).__name__}")
        h, w = rgb.shape[:2]
        # what DatasetMapper.__call__ does in test mode, from the decoded array on
        img_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous())
        resized = self.augmentation({"image": img_t})["image"].as_subclass(torch.Tensor).contiguous()
        return {"image": resized, "height": int(h), "width": int(w), **extra}

    def __call__(self, image: Union[ImageInput, List[ImageInput]], format: str = "RGB"):
        """Predict one image, or a list of images as one batch.

        Args:
            image: a ``uint8 (H, W, 3)`` array (channel order ``format``), an image path, or a list
                (or tuple) of those (one forward pass for the whole list).
            format: ``"RGB"`` (default) or ``"BGR"``, for arrays (paths are decoded as RGB).

        Returns:
            For one image, the model's output dict of the data contract at the image's ORIGINAL
            size, every tensor on the CPU: instance models ``{"scores": float32 (K,), "labels":
            int64 (K,), "masks": bool (K, H, W), "boxes": float32 (K, 4) xyxy pixels}``; semantic
            ``"sem_seg"`` float ``(C, H, W)``; panoptic ``"panoptic_seg"`` int32 ``(H, W)`` and
            ``"segments_info"`` (which a model returns: ``predictor.model.output_tasks``). For a
            list, a list of such dicts in input order.

        Raises:
            as :meth:`preprocess`, for the first bad image.
        """
        batched = isinstance(image, (list, tuple))
        images = list(image) if batched else [image]
        inputs = [self.preprocess(im, format=format) for im in images]
        if not inputs:
            return []
        with torch.no_grad():
            outputs = self.model(inputs)
        outputs = [_to_cpu(o) for o in outputs]
        return outputs if batched else outputs[0]

    def internals(self, image: ImageInput, format: str = "RGB", score_threshold: float = 0.5) -> Dict[str, Any]:
        """What the model does on one image (:meth:`instseg.modeling.MetaArchBase.internals`):
        ``{"result": <the output of predictor(image), at the original size>, "panels": [...]}``
        (panels: :mod:`instseg.modeling.internals`), every tensor on the CPU; draw it with
        :func:`instseg.utils.visualize.draw_internals`.

        Args:
            image, format: as :meth:`__call__` (one image).
            score_threshold: the instances whose internals are shown are those of score
                ``>= score_threshold`` (else the few highest).

        Raises:
            NotImplementedError: the model has no ``internals`` (the message names it).
            as :meth:`preprocess`.
        """
        inputs = [self.preprocess(image, format=format)]
        with torch.no_grad():
            out = self.model.internals(inputs, score_threshold=score_threshold)
        return _to_cpu(out[0])

    def __repr__(self) -> str:
        return (f"Predictor({self.cfg.MODEL.META_ARCHITECTURE}, weights={self.weights or 'random'!r}, "
                f"device={self.cfg.MODEL.DEVICE}, test size {self.cfg.INPUT.MIN_SIZE_TEST}/{self.cfg.INPUT.MAX_SIZE_TEST})")
