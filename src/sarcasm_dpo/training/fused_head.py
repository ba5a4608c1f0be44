"""Make TRL's fused LM head project only the labelled positions on CPU and MPS too.

    python -c "import sarcasm_dpo.training.fused_head as f; print(f.project_labelled_positions_only())"

TRL (1.x) trains SFT and DPO through a fused LM head: the backbone's hidden states go through the
output projection in tiles, and only log-probabilities (plus entropy and top-1 hits) come back,
never the (batch, length, vocabulary) logits. On a CUDA device with Triton it projects just the
positions whose label is not -100. Everywhere else it projects *every* position, because on
compiled backends (Neuron, XLA) a changing number of positions would force a recompilation.

Our SFT loss covers one answer word and EOS, so on a CPU that means running a 49,152- or
151,936-word projection, a softmax and an entropy over ~100 prompt positions per example only to
mask them out: the largest single cost of a CPU training step after the backbone. Eager CPU and
MPS kernels do not recompile, so picking the labelled rows first is safe there and gives the same
log-probabilities at those rows (the same per-row arithmetic, only fewer rows).

The switch is TRL's private `_use_triton` as imported into `trl.trainer.utils`, which that module
reads for this one decision (the kernels module keeps its own reference for choosing Triton
kernels, so nothing tries to launch Triton on a CPU). When a TRL release moves it, this does
nothing and says so: training stays correct, only slower on CPU.
"""

from __future__ import annotations

import warnings

_EAGER_DEVICES = ("cpu", "mps")


def project_labelled_positions_only() -> bool:
    """Patch once per process; True when the patch is (already) in place."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - trl is a dependency
        return False
    original = getattr(trl_utils, "_use_triton", None)
    if original is None or not callable(original):
        warnings.warn("TRL's fused LM head has no `_use_triton` switch in this version; on CPU it will project "
                      "every position (correct, slower).", stacklevel=2)
        return False
    if getattr(original, "labelled_positions_only", False):
        return True

    def compact_on_eager_devices(device) -> bool:
        return original(device) or getattr(device, "type", str(device)) in _EAGER_DEVICES

    compact_on_eager_devices.labelled_positions_only = True
    compact_on_eager_devices.original = original
    trl_utils._use_triton = compact_on_eager_devices
    return True
