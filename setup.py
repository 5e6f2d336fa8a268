"""itpn-ds: iTPN pre-training and fine-tuning at cluster scale on DeepSpeed."""
from setuptools import find_packages, setup

# torch/torchvision are pinned; deepspeed has no wheel and is built after torch with
# `pip install --no-build-isolation deepspeed==0.19.8` (the Makefile does this).
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "deepspeed==0.19.8",
    "timm>=1.0.0",
    "einops",
    "open-clip-torch>=3.0",
    "nvidia-dali-cuda130==2.4.0",
    "pyarrow>=15",
    "mlflow>=2.10",
    "safetensors",
    "pyyaml",
    "tqdm",
    "numpy",
    "pillow",
    "matplotlib",
    "psutil",
]

setup(
    name="itpn-ds",
    version="0.1.0",
    description="Integrally Pre-Trained Transformer Pyramid Networks (iTPN) on DeepSpeed + DALI",
    python_requires=">=3.10",
    packages=find_packages(include=["itpn_ds", "itpn_ds.*", "data_tools", "data_tools.*"]),
    # itpn_ds/ds_configs links to the top-level ds_configs/, so an installed package carries the JSONs.
    package_data={"itpn_ds": ["recipes/*.yaml", "ds_configs/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "scikit-image", "pycocotools"],
        "demo": ["scikit-image"],
        # detection shards and loaders decode COCO masks (RLE / polygons) with pycocotools
        "dense": ["pycocotools"],
    },
    entry_points={"console_scripts": ["itpn-ds = itpn_ds.cli:run"]},
)
