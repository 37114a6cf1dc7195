"""ds-pld: Progressive Layer Dropping and EarlyBERT for pre-LN BERT pretraining on DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="ds_pld",
    version="0.1.0",
    description="DeepSpeed plugin for pre-LN BERT pretraining with Progressive Layer Dropping, EarlyBERT and LAMB",
    packages=find_packages(include=["ds_pld", "ds_pld.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",
        "pydantic>=2.6",  # the config blocks (DeepSpeed 0.19 needs pydantic 2 too)
        "transformers>=5",
        "accelerate>=1.1.0",  # transformers.Trainer needs it (ds_pld.integrations.transformers)
        "datasets",
        "tokenizers",
        "mpi4py",
        "wandb",
        "tqdm",
        "psutil",
        "numpy",
        "matplotlib",
        "scikit-learn",
        "scipy",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "mpich", "ruff", "triton"],
        "triton": ["triton"],
    },
)
