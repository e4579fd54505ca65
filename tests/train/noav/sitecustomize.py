# A machine without PyAV, for the device-script test (tests/train/test_stage2_benchmarks.py puts this folder on
# PYTHONPATH): any import of av fails in every process; find_spec still answers, as diffusers probes with it.
import importlib.abc
import importlib.machinery
import sys


class _Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked for the dry run)")

    def exec_module(self, module):
        raise ModuleNotFoundError("blocked")


class _NoAV(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith("av."):
            return importlib.machinery.ModuleSpec(name, _Refuse())
        return None


sys.meta_path.insert(0, _NoAV())
