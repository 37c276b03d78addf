"""The CPU's name and bfloat16 instructions read from /proc/cpuinfo, and the training run's
refusal of an emulated bfloat16."""

import platform

import pytest
import tensorflow as tf

from keras_vae import hardware
from keras_vae.cli import main

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma {extra}

processor\t: 1
model name\t: Another CPU
flags\t\t: fpu avx512_bf16
"""
ARM = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd sve {extra}
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(
    "text, name, lacks",
    [
        (X86.format(extra=""), "AMD EPYC 7B13", True),
        (X86.format(extra="avx512f avx512_bf16"), "AMD EPYC 7B13", False),
        (X86.format(extra="amx_tile amx_bf16"), "AMD EPYC 7B13", False),
        (ARM.format(extra=""), None, True),
        (ARM.format(extra="bf16 i8mm"), None, False),
    ],
)
def test_cpu_info_reads_the_first_cpus_name_and_flags(tmp_path, text, name, lacks):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    model, flags = hardware.cpu_info(path)
    assert model == name
    assert ("avx2" in flags) == text.startswith("processor\t: 0\nvendor_id")
    assert hardware.lacks_bfloat16(path) is lacks
    assert hardware.cpu_model(path) == (name or platform.processor() or platform.machine())


def test_an_unreadable_cpuinfo_claims_nothing(tmp_path):
    assert hardware.cpu_info(tmp_path / "missing") == (None, None)
    assert hardware.lacks_bfloat16(tmp_path / "missing") is False


def test_train_refuses_bfloat16_that_the_cpu_would_emulate(tmp_path, monkeypatch, capsys):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(X86.format(extra=""))
    monkeypatch.setattr(hardware, "CPUINFO", str(cpuinfo))
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    run = tmp_path / "run"
    argv = ["train", "--precision", "mixed_bfloat16", "--run-dir", str(run), "--quiet"]
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    assert "'precision' mixed_bfloat16 needs a GPU" in message
    assert "(AMD EPYC 7B13) has none" in message
    assert not run.exists()
