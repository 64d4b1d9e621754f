"""Packaging for the real-time instance segmentation framework.

``pip install -e .`` installs the shared core (``instseg``) and the model packages, with
dependencies from the package registries only (nothing is compiled).
"""
from setuptools import find_packages, setup

setup(
    name="instseg",
    version="0.1.0",
    description="Train, evaluate and time SparseInst, FastInst, FASSST and QueryInst in one codebase",
    python_requires=">=3.10",
    packages=find_packages(include=["instseg", "instseg.*", "sparseinst", "sparseinst.*", "fastinst", "fastinst.*", "queryinst", "queryinst.*", "fassst", "fassst.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5.post20221221",
        "timm>=0.9",
        "lightning>=2.1",
        "pycocotools>=2.0.7",
        # the COCO evaluator's default COCOeval (TEST.COCO_EVAL_BACKEND "hotcoco"): pycocotools'
        # numbers in a fraction of the time (docs/architecture.md, "COCO evaluation backend")
        "hotcoco>=1.3",
        # Cityscapes labels, json2instanceImg and the official instance evaluation (2.3.0 runs on
        # NumPy >= 2.4 through instseg/evaluation/cityscapes_compat.py)
        "cityscapesscripts>=2.3",
        # clips polygons at a random crop (fvcore's CropTransform.apply_polygons, as Detectron2)
        "shapely>=2.0",
        "scipy>=1.10",
        "opencv-python-headless>=4.8",
        "numpy>=1.24",
        "pillow>=10",
        "tensorboard>=2.14",
        # OUTPUT_DIR/loss_curve.png at the end of training (instseg/utils/visualize.py)
        "matplotlib>=3.5",
        # instseg-demo's progress bar (Lightning depends on it too)
        "tqdm>=4.60",
        "pyyaml>=6",
    ],
    # instseg-quickstart's default config (a copy of configs/sparseinst/quickstart_R18.yaml and
    # its _BASE_ chain), so that it runs after a non-editable install too.
    package_data={"instseg.tools": ["configs/*.yaml", "configs/*/*.yaml"]},
    extras_require={
        # hypothesis: the fuzz tests of the data validation (tests/test_fuzz.py)
        "test": ["pytest>=7.4", "hypothesis>=6.100"],
        # TEST.COCO_EVAL_BACKEND "faster_coco_eval" (optional; hotcoco is the default)
        "fast-eval": ["faster-coco-eval>=1.5"],
        # instseg-export: ONNX export and its check with ONNX Runtime (instseg/export.py)
        "export": ["onnx>=1.15", "onnxruntime>=1.17", "onnxslim>=0.1"],
    },
    entry_points={
        # The model packages: the core loads every entry point of this group (instseg/discovery.py)
        # and names no model itself. A new model is a new package plus one line here.
        "instseg.models": [
            "sparseinst = sparseinst",
            "fastinst = fastinst",
            "queryinst = queryinst",
            "fassst = fassst",
        ],
        "console_scripts": [
            "instseg-train=instseg.tools.train_net:main",
            "instseg-eval=instseg.tools.eval_net:main",
            "instseg-benchmark=instseg.tools.benchmark_fps:main",
            "instseg-quickstart=instseg.tools.quickstart:main",
            "instseg-convert=instseg.tools.convert_official_weights:main",
            "instseg-check-dataset=instseg.tools.check_dataset:main",
            "instseg-demo=instseg.tools.demo:main",
            "instseg-export=instseg.tools.export_model:main",
            "instseg-benchmark-zoo=instseg.tools.benchmark_zoo:main",
        ]
    },
)
