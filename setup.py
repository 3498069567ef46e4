"""ltdet: long-tailed object detection on top of torchvision.

Metadata and dependencies live here; pyproject.toml holds the build system and the lint / type
check settings (`make lint`)."""

from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="ltdet",
    version="0.1.0",
    description="Long-tailed object detection (LVIS, COCO-LT) on top of torchvision",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ltdet", "ltdet.*"]),
    # The config schema ships inside the package (read through importlib.resources), so a
    # non-editable install loads configs.
    package_data={"ltdet": ["configs/*.yaml"]},
    entry_points={
        "console_scripts": [
            "ltdet-train = ltdet.scripts.train:main",
            "ltdet-test = ltdet.scripts.test:main",
            "ltdet-calibrate = ltdet.scripts.calibrate:main",
        ],
    },
    # The only Python CI runs (this machine has 3.11 alone); widen it once CI tests another.
    python_requires=">=3.11",
    # Ranges, not pins: GPU users must be able to bring their own CUDA build of torch. The lower
    # bounds are the oldest releases CI runs the test suite on (.ci/run: make test), nothing
    # older: CI machines have no GPU and install torch from a local mirror, where an older
    # release would be a multi-GB CUDA download. With another version, run the suite yourself:
    #   pip install -e '.[dev]' torch==X torchvision==Y && python -m pytest -q -m "not slow"
    install_requires=[
        "torch>=2.14",
        "torchvision>=0.29",
        "numpy>=1.21",
        "pycocotools>=2.0.6",
        # lvis 0.5.3 does not declare pycocotools; both are listed explicitly.
        "lvis>=0.5.3",
        "opencv-python-headless>=4.5",
        "pyyaml>=5.4",
        "tqdm>=4.60",
        "tensorboard>=2.10",
        "matplotlib>=3.5",
        "msgspec>=0.18",  # typed json decoding of result files (ltdet.evaluation.results_io)
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "faster-coco-eval>=1.6",
            "psutil>=5.8",
            # reference implementations in tests (scipy's gaussian_filter1d for LDS / FDS)
            "scipy>=1.7",
            # make lint
            "ruff>=0.6",
            "mypy>=1.10",
        ],
    },
)
