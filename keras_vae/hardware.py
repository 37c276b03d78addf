"""What this machine's CPU is and which of its instructions the precision policies need,
read from Linux's /proc/cpuinfo (elsewhere the CPU is named by ``platform`` and its
instructions are unknown)."""

import platform

CPUINFO = "/proc/cpuinfo"

# AVX-512 BF16 and AMX-BF16 on x86, FEAT_BF16 on Arm: oneDNN runs bfloat16 on these.
BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_info(path=None):
    """(model name, feature flags) of the first CPU in ``path`` (default ``CPUINFO``); (None,
    None) where it cannot be read, and flags None where it lists none."""
    name = flags = None
    try:
        with open(path or CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model name") and name is None:
                    name = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = frozenset(value.split())
                elif not line.strip() and (name or flags):
                    break  # the first CPU's block ends at a blank line
    except OSError:
        pass
    return name, flags


def cpu_model(path=None):
    """The CPU's model name, else what ``platform`` reports."""
    return cpu_info(path)[0] or platform.processor() or platform.machine()


def lacks_bfloat16(path=None):
    """True where the CPU's flags are known and have no bfloat16 instructions."""
    flags = cpu_info(path)[1]
    return flags is not None and not flags & BFLOAT16_FLAGS


def emulates_bfloat16():
    """True where no GPU is visible and the CPU lacks bfloat16 instructions: TensorFlow then
    runs bfloat16 in software, slower than float32 and with convolutions' kernel gradients
    summed in bfloat16 (docs/training.md#several-devices-hosts-precisions)."""
    import tensorflow as tf  # here, so that naming the CPU needs no TensorFlow

    return not tf.config.list_physical_devices("GPU") and lacks_bfloat16()
