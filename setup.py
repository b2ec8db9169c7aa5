"""BAHE Engine: LLM-enhanced CTR prediction over long textual user behaviors (BAHE, SIGIR'24)."""
from setuptools import find_packages, setup

# What each `bahe` command needs beyond install_requires (README, "Without make"); tests/scripts/test_cli_packaging.py
# checks every third-party import a command reaches against this. demo: scikit-learn for the classic baselines of
# `bahe demo`, LightGBM for its gradient boosting where LightGBM runs it, matplotlib for the plots of `bahe bench`
# and `python -m bench.history`.
DEMO = ["scikit-learn", "lightgbm==4.7.0", "matplotlib"]

setup(
    name="bahe-engine",
    version="0.1.0",
    description="Triton-kernel optimized inference engine for BAHE LLM-based CTR prediction",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "weights", "weights.*", "bench", "bench.*"]),
    install_requires=[
        "torch==2.13.0",
        "triton==3.7.1; platform_system == 'Linux'",
        "transformers==5.24.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "numpy==2.4.6",
        "tqdm",
        "pandas",
        "pyarrow",
        "filelock==4.3.1",
    ],
    extras_require={
        "demo": DEMO,
        "test": ["pytest==9.2.0", "pytest-benchmark==5.3.1", "hypothesis", *DEMO],
        "smollm2": ["gguf==0.19.0", "accelerate"],
    },
    entry_points={"console_scripts": ["bahe=engine.cli:main"]},
)
