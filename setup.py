"""The compiled modules (Cython), built at `pip install` (vagrant/provision.sh install, editable;
bastion, not editable): appliance/hotpath/_compiled.pyx (the relay's and masking's byte paths),
analytics/_chain.pyx (the audit writer's row hash) and analytics/_schema.pyx (the audit record's
validation on the producer's thread). Everything else is in pyproject.toml. A
machine that cannot build them (no Cython, no C compiler) still installs: appliance.hotpath,
analytics.chain and analytics.schema then run their pure-Python reference and say so (`COMPILED = False`)."""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the hot paths if possible; a failure leaves the pure-Python reference in charge."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 (any build failure means: no extension)
            print(f"botwarden: the compiled hot paths were not built ({e}); the pure-Python "
                  "reference will run", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"botwarden: could not build {ext.name} ({e}); the pure-Python reference will run",
                  file=sys.stderr)


def extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("botwarden: Cython is not installed; the pure-Python hot paths will run", file=sys.stderr)
        return []
    built = []
    for ext in (Extension("appliance.hotpath._compiled", ["appliance/hotpath/_compiled.pyx"], extra_compile_args=["-O2"]),
                Extension("analytics._chain", ["analytics/_chain.pyx"], extra_compile_args=["-O2"],
                          libraries=["crypto"]),
                Extension("analytics._schema", ["analytics/_schema.pyx"], extra_compile_args=["-O2"])):
        try:  # one module Cython cannot translate leaves the others built
            built += cythonize([ext], compiler_directives={"language_level": "3"}, quiet=True)
        except Exception as e:  # noqa: BLE001
            print(f"botwarden: could not translate {ext.name} ({e}); the pure-Python reference will run",
                  file=sys.stderr)
    return built


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
