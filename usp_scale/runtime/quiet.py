"""The start-up messages of the libraries we run on that are known to be benign, silenced once per process by
:func:`usp_scale.runtime.init_runtime` (this module is their one home). Each filter matches one message exactly and
says why dropping it is safe; every other warning still prints. docs/training.md ("Start-up messages") lists these and
the messages left on purpose. ``USP_SCALE_ALL_WARNINGS=1`` keeps them all (to check a new torch/diffusers/DeepSpeed).
"""
from __future__ import annotations

import logging
import os
import warnings

# (logger name, message prefix): logging records dropped at the logger that emits them
_BENIGN_LOG_RECORDS = (
    # torch 2.14 handles Enum classes natively in pytrees and warns (twice: KernelPreference, ScaleCalculationMode)
    # when torchao, imported by diffusers' torchao quantizer when diffusers loads a model, still registers its enums
    # with register_constant(). The registration still works; nothing of ours registers pytree nodes or uses
    # torchao's enums (engine.fp8 uses torchao's float8 training, whose behaviour this message does not change).
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
    # diffusers tries to add torchao's quantized tensor classes to torch.load's safe globals, for checkpoints that
    # diffusers itself quantized with torchao; the installed torchao moved them. We load no torchao-quantized
    # checkpoint (our VAEs are plain float weights read through usp_scale.checkpoint.safe_load or safetensors).
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
)
# only on a CPU device: torch.utils.cpp_extension (imported by DeepSpeed) found CUDA_HOME but no CUDA device; on a
# CPU job that is the expected state (DeepSpeed then builds its CPU ops), not a broken CUDA set-up
_CPU_LOG_RECORDS = (("torch.utils.cpp_extension", "No CUDA runtime is found"),)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_INSTALLED: set = set()


def quiet_benign_warnings(cpu: bool) -> None:
    """Install the filters (idempotent). ``cpu``: the job runs on the CPU (adds the CPU-only ones)."""
    if os.environ.get("USP_SCALE_ALL_WARNINGS") == "1":
        return
    records = _BENIGN_LOG_RECORDS + (_CPU_LOG_RECORDS if cpu else ())
    for name, prefix in records:
        if (name, prefix) in _INSTALLED:
            continue
        _INSTALLED.add((name, prefix))
        logging.getLogger(name).addFilter(_DropPrefixes([prefix]))
    # FSDP2 warns when a wrapped module returns a view tensor (our MAE returns pred = x[:, 1:, :]), because an
    # in-place op on that view by the caller would skip FSDP2's pre-backward hook. Our code never modifies a model's
    # output in place: the tasks' losses (usp_scale/training/tasks.py) and the engines' steps take them out of
    # place; tests/test_golden_losses.py and tests/test_resume_reshard.py check FSDP2's losses and gradients
    # against the local engine, which they would not match if a hook were skipped.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor",
                            category=UserWarning)
