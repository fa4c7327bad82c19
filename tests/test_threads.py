"""The CPU a run records (training/threads.py ``cpu_model``): the first processor's model
name with its family, model and stepping, so that two CPU generations a virtual machine
names alike are told apart."""

from __future__ import annotations

from pathlib import Path

from training.threads import cpu_model

_TWO_PROCESSORS = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu avx512f

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 0
"""


def test_the_model_name_carries_the_first_processors_family_model_and_stepping(
    tmp_path: Path,
) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(_TWO_PROCESSORS)
    assert cpu_model(info) == "AMD EPYC (family 25, model 17, stepping 1)"
    older = _TWO_PROCESSORS.replace("model\t\t: 17", "model\t\t: 1").replace(
        "stepping\t: 1", "stepping\t: 0"
    )
    info.write_text(older)
    assert cpu_model(info) == "AMD EPYC (family 25, model 1, stepping 0)"


def test_a_name_without_numbers_stays_bare_and_no_name_falls_back_to_the_platform(
    tmp_path: Path,
) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert cpu_model(info) == "Some CPU"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # no model name (some ARM kernels)
    assert cpu_model(info) and "(" not in cpu_model(info)
    assert cpu_model(tmp_path / "missing") == cpu_model(info)
