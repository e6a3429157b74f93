"""molmo-jax: Molmo / PixMo vision-language models in JAX, from one CPU core to TPU pods."""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "einops>=0.8",
    "safetensors==0.8.0",
    "tokenizers>=0.22",
    "numpy>=2.0",
    "pillow>=11",
    "scipy>=1.13",
    "pyarrow>=17",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.9",
    "jinja2>=3.1",  # Molmo2 chat templates (predict)
]

EXTRAS = {
    # what the test suite needs on top of the core stack
    "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6.100", "scikit-image>=0.24",
             "httpx>=0.27"],
    # PyTorch parity and export checks; 2.13.0 is the CPU wheel (a bare "torch" pulls CUDA builds)
    "torch": ["torch==2.13.0", "transformers>=5.0"],
    # TFDS builders writing ArrayRecord (TensorFlow itself is not needed for the grain path)
    "tfds": ["tensorflow-datasets==4.9.10", "array_record>=0.5", "importlib_resources>=6"],
    # optional seqio adapters (pulls the full tensorflow wheel)
    "seqio": ["seqio>=0.0.20", "tensorflow>=2.17", "tensorflow-datasets==4.9.10"],
    # the HTTP server (python -m molmo_jax.serve)
    "serve": ["fastapi>=0.115", "uvicorn>=0.30"],
    # video decoding for Molmo2 (PyAV)
    "video": ["av>=12"],
    # LoRA / QLoRA adapters and weight quantisation
    "lora": ["qwix==0.1.8"],
    # AOT compilation for TPU topologies on a CPU machine
    "tpu": ["libtpu"],
}

setup(
    name="molmo-jax",
    version="0.1.0",
    description="Molmo vision-language models (Molmo and PixMo, arXiv 2409.17146) in JAX/Flax NNX",
    packages=find_packages(include=["molmo_jax*", "data_pipelines*", "configs*", "launch*"]),
    package_data={"molmo_jax.serving": ["page.html"]},  # the served page ships with the package
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
