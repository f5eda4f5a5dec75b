"""shortcut_jax: one-step and few-step generative models (shortcut models) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="shortcut_jax",
    version="0.1.0",
    description="Shortcut models and few-step generative baselines in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["shortcut_jax", "shortcut_jax.*"]),
    # the CIFAR-10 classifier behind the classifier Frechet distance (CFD)
    package_data={"shortcut_jax.evaluation": ["cifar10_classifier/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10.0",
        # epath: local and gs:// folders alike (checkpoints, metrics, run folders)
        "etils[epath]>=1.5",
        "matplotlib>=3.7",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        # the Stable Diffusion VAE's weights (diffusers' .safetensors, read through its numpy API)
        "safetensors>=0.4",
    ],
    extras_require={
        # data.name='tfds': reads data sets TFDS prepared in ArrayRecord, without TensorFlow
        # (gcsfs reads data_dir=gs://... metadata). Preparing a data set (`tfds build`) needs
        # TensorFlow as well: pip install tensorflow-cpu, on the machine that prepares it.
        # Minimum versions are the ones tested.
        "tfds": ["tensorflow-datasets>=4.9.10", "grain>=0.2.18", "array-record>=0.8", "gcsfs"],
        # reading pytorch-fid's .pth FID Inception weights (once, to convert them to a .npz that
        # loads without torch: python -m shortcut_jax.evaluation.inception --convert ...)
        "fid-convert": ["torch"],
        # nbformat, nbclient and ipykernel execute notebooks/shortcut_colab.ipynb headlessly
        # torch: the parity tests write .pth/.bin weights with torch.save and compare the image
        # resize with torch's; 2.13.0 is the version they were checked with (a CPU build where
        # one is on the package path, e.g. pip's --find-links)
        # data.name='digits' (scikit-learn's 8x8 digits)
        "digits": ["scikit-learn>=1.3"],
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "scikit-learn>=1.3",
            "pytest-xdist>=3.5",
            "tensorflow-datasets>=4.9.10",
            "grain>=0.2.18",
            "array-record>=0.8",
            "nbformat>=5.11",
            "nbclient>=0.11",
            "ipykernel>=7.0",
            "torch==2.13.0",
        ],
        "wandb": ["wandb"],
        # VAE weights by hub id (python -m shortcut_jax.encode --vae=stabilityai/sd-vae-ft-mse)
        "hub": ["huggingface_hub>=0.20"],
        # gs:// workdirs: gcsfs for etils.epath (checkpoints, metrics), google-cloud-storage for
        # TensorBoard's event files
        "gcs": ["gcsfs", "google-cloud-storage"],
    },
)
