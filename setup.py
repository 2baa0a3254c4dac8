from setuptools import find_packages, setup

setup(
    name="var-toolkit",
    version="0.1.0",
    description=(
        "Visual autoregressive (next-scale prediction) image generation: multi-scale VQ tokenizer, "
        "VAR transformer, CoDe / ScaleKV / SJD samplers and FID/IS evaluation"
    ),
    packages=find_packages(include=["var", "var.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "einops",
        "accelerate",
        "timm",
        "pillow",
        # var/eval calls torch-fidelity internals (registry, create_feature_extractor, kid/prc_features_to_metric,
        # FeatureExtractorBase); tests/test_fidelity_internals.py guards them. Tested with 0.4.0.
        "torch-fidelity>=0.4.0,<0.5",
        "safetensors",
        "huggingface_hub>=0.25",  # var.hub: hf_hub_download, the shared cache, huggingface_hub.errors (0.25+)
        "pyyaml",
        "tqdm",
        "numpy",
        "scikit-learn",
        "scipy",
        "tensorboard",
        "matplotlib",
        "transformers>=5",  # the T5 text encoder of text-to-image models (var/text.py)
        "sentencepiece",  # T5 tokenizers shipped as spiece.model only
    ],
    extras_require={"dev": ["pytest", "ruff", "lpips"]},
    entry_points={"console_scripts": ["var=var.cli:main"]},
)
