"""Only the optional C extension lives here (everything else is in pyproject.toml): the entropy coder
taskcodec/coding/c/taskcodec_coder.c bound as taskcodec.coding._tcc, built with the plain C compiler at install time.
``optional=True``: without a compiler the install still succeeds and taskcodec.coding uses its numpy/Python coder,
which writes and reads the same bytes."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "taskcodec.coding._tcc",
            sources=["taskcodec/coding/c/_tcc_module.c", "taskcodec/coding/c/taskcodec_coder.c"],
            include_dirs=["taskcodec/coding/c"],
            extra_compile_args=["-std=c99", "-O2"],
            optional=True,
        )
    ]
)
