"""edgevl_jax: CLIP -> small int8 multi-modality edge encoders, in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax[cpu]>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.1.0,<1.2",
    "aqtp>=0.9.0,<0.10",
    "tensorflow-datasets>=4.9.10,<4.10",
    "grain>=0.2.18,<0.3",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    "absl-py>=2.1",
    "numpy>=1.26",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "pillow>=10",
    "scikit-learn>=1.4",
    # jax.export serialisation of the edge artefact.
    "flatbuffers>=24.3",
    # The ONNX edge artefact (export) and its runtime (tests, demo metrics).
    "onnx>=1.23,<1.24",
    "onnxruntime>=1.32,<1.33",
]

EXTRAS = {
    # torch is the reference implementation for parity tests (CPU build).
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "nbformat>=5.9",
        "nbclient>=0.10",
        "ipykernel>=6.29",
        "openvino==2026.4.*",
    ],
    # What a device needs to run the ONNX artefact (export.edge_predict,
    # `python -m edgevl_jax.export.predict`): no JAX. Install with
    # `pip install --no-deps .` plus these, or copy the two modules.
    "edge": ["onnxruntime>=1.32,<1.33", "numpy>=1.26", "pillow>=10"],
    "openvino": ["openvino==2026.4.*"],
    # Preparing public TFDS datasets (EuroSAT from its original source) needs TF.
    "prepare": ["tensorflow-cpu>=2.16", "tifffile>=2024.1"],
    "bench": ["torch==2.13.0", "psutil>=5.9"],
}

setuptools.setup(
    name="edgevl_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["edgevl_jax", "edgevl_jax.*"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
