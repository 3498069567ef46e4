"""ltdet: long-tailed object detection on top of torchvision."""
from setuptools import find_packages, setup

setup(
    name="ltdet",
    version="0.1.0",
    description="Long-tailed object detection (LVIS, COCO-LT) on top of torchvision",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ltdet", "ltdet.*"]),
    python_requires=">=3.9",
    # Ranges, not pins: GPU users must be able to bring their own CUDA build of torch.
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.21",
        "pycocotools>=2.0.6",
        # lvis 0.5.3 does not declare pycocotools; both are listed explicitly.
        "lvis>=0.5.3",
        "opencv-python-headless>=4.5",
        "pyyaml>=5.4",
        "tqdm>=4.60",
        "tensorboard>=2.10",
        "matplotlib>=3.5",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2.1", "faster-coco-eval>=1.6", "psutil>=5.8",
                # reference implementations in tests (scipy's gaussian_filter1d for LDS / FDS)
                "scipy>=1.7"],
    },
)
