"""Build wiring for the C++ extensions (pybind11).

Everything else about the package lives in pyproject.toml. A compile failure
fails the install: there is no silent pure-Python fallback.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

EXT_MODULES: list = [
    # Micro-batch planner for AMoPO groups; wrapper: megatron_amopo/data/planner.py.
    Pybind11Extension(
        "megatron_amopo._planner",
        ["csrc/packing.cpp", "csrc/planner.cpp", "csrc/bindings.cpp"],
        depends=["csrc/packing.h", "csrc/planner.h"],
        cxx_std=17,
        extra_compile_args=["-O3", "-pthread"],
        extra_link_args=["-pthread"],  # std::thread (window planning) on glibc < 2.34
    ),
]

setup(ext_modules=EXT_MODULES, cmdclass={"build_ext": build_ext})
