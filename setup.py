"""ds-pld: Progressive Layer Dropping and EarlyBERT for pre-LN BERT pretraining on DeepSpeed."""
from setuptools import find_packages, setup

# Extras: the trainer, data pipeline, GLUE and the console commands need TRAIN.
TRAIN = ["datasets", "tokenizers", "tqdm", "psutil", "matplotlib", "scikit-learn", "scipy"]
HF = ["accelerate>=1.1.0"]  # transformers.Trainer (ds_pld.integrations.transformers)
MPI = ["mpi4py"]
WANDB = ["wandb"]

setup(
    name="ds_pld",
    version="0.1.0",
    description="DeepSpeed plugin for pre-LN BERT pretraining with Progressive Layer Dropping, EarlyBERT and LAMB",
    packages=find_packages(include=["ds_pld", "ds_pld.*"]),
    python_requires=">=3.10",
    package_data={"ds_pld": ["configs/*.json"]},
    # The plugin core: ds_pld.initialize, PLD, EarlyBERT, LAMB and the model (its output type is transformers').
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.17.6,<0.20",  # ds_pld.compat.SUPPORTED_DEEPSPEED; launch/check_deepspeed_versions.sh
        "pydantic>=2.6",  # the config blocks (DeepSpeed 0.19 needs pydantic 2 too)
        "transformers>=5",
        "numpy",
    ],
    extras_require={
        "train": TRAIN,
        "hf": HF,
        "mpi": MPI,
        "wandb": WANDB,
        "all": TRAIN + HF + MPI + WANDB,
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "mpich", "ruff", "triton"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": [
        "ds-pld-train=ds_pld.cli.train:main",
        "ds-pld-finetune=ds_pld.cli.finetune:main",
        "ds-pld-export=ds_pld.cli.export_hf:main",
        "ds-pld-prepare=ds_pld.cli.prepare_data:main",
    ]},
)
