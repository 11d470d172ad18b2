from pathlib import Path

from setuptools import find_packages, setup

requirements = [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith("pytest")]

setup(
    name="wan22-fast",
    version="0.1.0",
    description="Faithful, fast Wan 2.2 inference in PyTorch (T2V-A14B, I2V-A14B, TI2V-5B)",
    packages=find_packages(include=["wan", "wan.*"]),
    package_data={"wan": ["configs/*.json"]},  # the published step-cache ratios (wan/step_cache.py)
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"fa3": ["fa3-fwd"], "flash2": ["flash-attn"], "gguf": ["gguf>=0.13"],
                    "test": ["pytest", "ruff", "gguf>=0.13"]},
)
