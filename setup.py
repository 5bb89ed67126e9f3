"""dearkd_fast: fast, faithful DearKD (data-efficient early knowledge distillation for ViTs)."""
from setuptools import setup

setup(
    name="dearkd_fast",
    version="0.1.0",
    description="Fast PyTorch implementation of DearKD: early knowledge distillation for vision transformers",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["dearkd_fast", "dearkd_fast.models", "dearkd_fast.data", "dearkd_fast.kernels"],
    package_dir={"dearkd_fast": "dearkd_fast", "dearkd_fast.kernels": "kernels"},
    # the native CPU backend's sources travel with the package: python -m dearkd_fast.native builds them
    # after pip has installed torch (see dearkd_fast/native.py)
    package_data={"dearkd_fast.kernels": ["configs.json", "native/*.cpp", "native/*.h", "native/CMakeLists.txt"],
                  "dearkd_fast": ["recipes/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=1.0",
        "numpy",
        "pillow",
        "tqdm",
        "pyyaml",  # --config files
        "scikit-learn",
        "matplotlib",  # the study's plots
    ],
    extras_require={
        # the versions that lie on this project's machines' disk, plus everything the tests need
        "dev": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "ruff==0.17.6",
            "nvidia-dali-cuda130",
        ],
        "dali": ["nvidia-dali-cuda130"],
    },
    entry_points={
        "console_scripts": [
            "dearkd-train=dearkd_fast.train:main",
            "dearkd-invert=dearkd_fast.invert:main",
            "dearkd-study=dearkd_fast.study:main",
        ]
    },
)
