"""Build m2mega: the Python package, the Triton kernels (installed as ``m2mega.kernels``) and the
``m2mega._C`` extension from ``csrc/`` (CPU always; CUDA too when torch was built with CUDA and nvcc is
found). ``M2MEGA_NO_EXT=1`` skips the extension (the pure-torch reference path is then used)."""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("M2MEGA_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not cpp:
        return [], {}
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    ldflags = ["-fopenmp"]
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    use_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("M2MEGA_FORCE_CPU_EXT") == "1":
        use_cuda = False
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "m2mega._C",
            cpp + cu,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("M2MEGA_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]
                + os.environ.get("M2MEGA_NVCC_ARCH", "-gencode=arch=compute_90a,code=sm_90a").split(),
            },
            extra_link_args=ldflags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "m2mega._C",
            cpp,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="m2mega",
    version="0.1.0",
    description="M2-Reasoning (Qwen2.5-VL, cold-start SFT + multi-task GRPO) on megatron-core",
    python_requires=">=3.11",
    # kernels/ is installed as m2mega.kernels: a top-level 'kernels' would clash with the unrelated
    # PyPI package of that name (huggingface 'kernels').
    packages=find_packages(include=["m2mega", "m2mega.*"]) + ["m2mega.kernels"],
    package_dir={"m2mega.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "triton==3.6.0",
        "numpy",
        "pybind11",
        "sentencepiece",
        "safetensors",
        "tokenizers",
        "pillow",
        "av>=16,<19",  # PyAV: video decoding/encoding (m2mega.data.video); its wheels bundle FFmpeg
        "sympy",
        "math-verify>=0.9,<0.10",  # the math answer grader engine (m2mega.rewards.grader; pins latex2sympy2_extended)
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "psutil",  # megatron dist_checkpointing's async writer needs it
        "transformers>=5.0",  # HuggingFaceTokenizer (AutoTokenizer) in tools/preprocess_data.py
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "transformers>=5.0", "wandb"],
        "parity": ["transformers>=5.0"],
        "gpu": ["transformer-engine", "flash-attn", "liger-kernel"],
    },
)
