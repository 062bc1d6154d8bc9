"""Make Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``) work with numpy >= 2.3.

The interpreter stores every scalar (kernel arguments, ``K // BLOCK``) as a shape-(1,) numpy array and
converts it with ``int(array)`` when it is used as a loop bound; numpy 2.3+ refuses that ("only
0-dimensional arrays can be converted to Python scalars"), so any ``for i in range(0, K, BLOCK)`` with a
runtime bound fails under the interpreter. We re-install the interpreter's ``__index__`` hook to take the
single element explicitly. Applied only in interpreter mode and only when numpy actually refuses; GPU runs
never touch this module's patch.
"""

from __future__ import annotations

import numpy as np


def apply() -> None:
    try:
        int(np.zeros(1, dtype=np.int32))
        return  # this numpy still converts size-1 arrays: nothing to fix
    except TypeError:
        pass
    from triton.runtime import interpreter

    if getattr(interpreter, "_m2mega_index_patch", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._m2mega_index_patch = True
