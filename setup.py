"""usp_scale package.

The Triton kernels live in the top-level folder ``kernels/`` (beside ``usp_scale/``, ``launchers/``, ``configs/``) and
are installed as ``usp_scale.kernels`` (``package_dir``); they are a leaf package: nothing in them imports the rest of
the library. An unrelated PyPI package named ``kernels`` exists and diffusers probes for it, so the folder is never
importable as a top-level module ``kernels`` (its ``__init__`` refuses that name); in a source checkout
``usp_scale/__init__.py`` maps ``usp_scale.kernels`` to the folder (tests/test_packaging.py checks both, and a
fresh install).

Version ranges admit a GPU user's own CUDA torch (e.g. 2.11 on the benchmark machines);
CI and the README install the pinned CPU-capable stack (torch 2.14.1, torchvision 0.29.1).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["usp_scale", "usp_scale.*"]) + ["usp_scale.kernels"]

extras = {
    # webdataset: the interop test of our tar reader (tests/test_data_datasets.py writes and reads shards with it)
    "test": ["pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2", "scipy>=1.10", "webdataset>=0.2"],
    # the versions tests/ ran against (usp_scale.engine.deepspeed.DEEPSPEED_RANGE; the engine refuses others)
    "deepspeed": ["deepspeed>=0.19.8,<0.20"],
    "dali": ["nvidia-dali-cuda130>=1.40"],
    "eval": ["torch-fidelity>=0.3", "scipy>=1.10"],
    # the TF tier of the tests (tests/test_eval_tf.py: TensorFlow runs the Inception graph beside our evaluator);
    # the CPU wheel (274 MB, 1.4 GB installed with its dependencies), the version tested beside torch 2.14.1 and
    # numpy 2.4; not in "all" (CI installs it explicitly)
    "tf": ["tensorflow-cpu>=2.21,<2.22; platform_system == 'Linux' and platform_machine == 'x86_64'",
           "tensorflow>=2.21,<2.22; platform_system != 'Linux' or platform_machine != 'x86_64'"],
    "gpu": ["triton>=3.0"],
    "flash": ["flash-attn>=2.6"],
    "plot": ["matplotlib>=3.7"],
    # the trainer's TensorBoard events (logging.tensorboard: true by default; without it the trainer warns once)
    "log": ["tensorboard>=2.14"],
    # engine.fp8 (torchao float8 training); capped at the version tested with torch 2.14
    "fp8": ["torchao>=0.12,<0.19"],
}
extras["all"] = sorted({d for k, v in extras.items() if k not in ("flash", "tf") for d in v})

setup(
    name="usp_scale",
    version="0.1.0",
    description="Distributed USP: masked latent pretraining and transfer to DiT/SiT/ViT",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"usp_scale.kernels": "kernels"},
    # the small trained VAE and feature extractor of the synthetic dataset (weights + asset.json + README.md)
    package_data={"usp_scale.assets": ["*/*/*.json", "*/*/*.safetensors", "*/*/*.md"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=1.0",
        "diffusers>=0.30",
        "numpy>=1.24",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "pillow>=9",
    ],
    extras_require=extras,
)
