"""Packaging for sparse-engine.

The kernels live in ``sparse_engine/kernels/``, not in a top-level ``kernels/`` folder: from
the repository root (pytest, ``python -m``) that folder would shadow Hugging Face's
``kernels`` library, which ``transformers`` 5.25 requires and imports when it loads a model.
"""
from setuptools import setup

setup(
    name="sparse-engine",
    version="0.1.0",
    description="Sparse adapters for LLMs: Triton kernels, Algorithm 1 training, merging and serving",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["sparse_engine", "sparse_engine.data", "sparse_engine.serving", "sparse_engine.merging",
              "sparse_engine.experiments", "sparse_engine.kernels"],
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "peft>=0.13",
        "datasets>=2.19",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "rouge-score>=0.1.2",
        "tqdm>=4.60",
        "numpy>=1.24",
        "accelerate>=0.34",
        "matplotlib>=3.7",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "dev": ["pytest>=7", "triton>=3.0", "ruff>=0.5", "import-linter>=2.0"],
        "bench": ["triton>=3.0"],
    },
    entry_points={"console_scripts": ["sparse-engine=sparse_engine.cli:main"]},
)
