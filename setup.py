"""Build script for r1fast.

Pure Python everywhere by default. The optional CUDA extension ``r1fast._C`` is built from
``csrc/`` only when nvcc and a CUDA-enabled torch are both present:

    R1FAST_BUILD_CUDA=auto|0|1   auto (default, also when empty): build when possible; 0: never; 1: must build
    R1FAST_CUDA_ARCHS=90a        semicolon-separated arch list passed to nvcc (Hopper by default)

``kernels/`` is installed as ``r1fast.kernels`` through ``package_dir``: a top-level ``kernels``
module would shadow HuggingFace's ``kernels`` package, which transformers imports.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_build_wanted():
    """Decide whether to build r1fast._C; returns (build, reason)."""
    # empty (R1FAST_BUILD_CUDA= in a CI matrix) means auto, as an empty R1FAST_KERNELS does
    mode = os.environ.get("R1FAST_BUILD_CUDA", "").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"R1FAST_BUILD_CUDA must be auto, 0 or 1 (empty = auto), got {mode!r}")
    if mode == "0":
        return False, "R1FAST_BUILD_CUDA=0"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    problems = []
    if not sources:
        problems.append("csrc/ holds no .cpp/.cu sources")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        problems.append("nvcc not found")
    try:
        import torch

        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} is not a CUDA build")
    except ImportError:
        problems.append("torch is not installed in the build environment")
    if problems:
        if mode == "1":
            raise SystemExit("R1FAST_BUILD_CUDA=1 but r1fast._C cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, "nvcc and CUDA torch found"


def _ext_modules():
    build, reason = _cuda_build_wanted()
    if not build:
        print(f"r1fast: skipping CUDA extension r1fast._C ({reason}); Triton/PyTorch paths are used", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = [a.strip() for a in os.environ.get("R1FAST_CUDA_ARCHS", "90a").split(";") if a.strip()]
    gencode = []
    for arch in archs:
        num = arch.rstrip("a")
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}" if num != arch else f"arch=compute_{num},code=sm_{num}"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = CUDAExtension(
        name="r1fast._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()

packages = find_packages(include=["r1fast", "r1fast.*"])
packages += ["r1fast.kernels"] + ["r1fast.kernels." + p for p in find_packages(where="kernels")]
packages += ["r1fast.recipes"]  # recipes/*.toml ship with the package: the tiny recipe is the default run

setup(
    name="r1fast",
    version="0.1.0",
    description="Performance-first engine for DeepSeek-R1-style GRPO reasoning RL with Triton kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"r1fast.kernels": "kernels", "r1fast.recipes": "recipes"},
    package_data={"r1fast.recipes": ["*.toml"]},
    install_requires=[
        "torch>=2.6",  # torch.distributed.fsdp.fully_shard (FSDP2's public path) first shipped in 2.6
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "rich>=13",
        "math-verify>=0.7",
        "matplotlib>=3.7",
        "jinja2>=3.1.6",  # chat templates render in its sandbox; older releases have sandbox escapes
        "tomli>=1.1; python_version < '3.11'",
    ],
    extras_require={
        # liger-kernel: the drop-in equality test runs against it (its torch path works on CPU); transformers 5:
        # the architecture and RoPE tests read config.rope_parameters (4.x has only rope_scaling); accelerate:
        # transformers loads block-FP8 checkpoints only with it (the FP8 checkpoint parity test)
        "test": ["pytest>=8", "pytest-timeout", "transformers>=5", "liger-kernel>=0.8", "accelerate>=1"],
        "deepspeed": ["deepspeed"],
        "flash": ["flash-attn"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
