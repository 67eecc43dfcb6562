"""What a model file and a report record of the computer: CPU, threads, kernel variables."""
import pytest
import torch

from vaeuda import machine
from vaeuda.modelfile import load_model
from vaeuda.train import train_source


@pytest.fixture
def no_kernel_variables(monkeypatch):
    """The environment without any of machine.KERNEL_VARIABLES; set the ones a test needs on the result."""
    for name in machine.KERNEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cpu_model_reads_cpuinfo_and_falls_back_to_platform(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: Test\nmodel name\t: Test CPU 9000 @ 1.00GHz\nflags\t: fpu\n")
    monkeypatch.setattr(machine, "CPUINFO", cpuinfo)
    assert machine.cpu_model() == "Test CPU 9000 @ 1.00GHz"
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    assert machine.cpu_model() == "x86_64"


def test_numerics_names_the_threads_and_only_the_kernel_variables_that_are_set(no_kernel_variables):
    monkeypatch = no_kernel_variables
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    monkeypatch.setenv("HOME", "/home/someone")                       # not a kernel variable
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        numerics, line = machine.numerics(), machine.description()
    finally:
        torch.set_num_threads(threads)
    assert numerics["environment"] == {"MKL_CBWR": "COMPATIBLE"}
    assert numerics["threads"] == 1 and numerics["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f", 1 thread, {numerics['cpu_capability']} kernels, MKL_CBWR=COMPATIBLE" in line
    assert line.startswith(machine.cpu_model() + ", ")


def test_a_model_file_records_the_numerics_it_was_trained_with(tiny_cohort, tmp_path, no_kernel_variables):
    no_kernel_variables.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")                  # recorded (set too late to change kernels here)
    out = tmp_path / "src.safetensors"
    train_source([tiny_cohort / "mr_1001_image.nii.gz"], [tiny_cohort / "mr_1001_label.nii.gz"], out, preset="tiny",
                 iterations=1, seed=0, device="cpu")
    recorded = load_model(out)[1]["provenance"]["numerics"]
    assert recorded == {"cpu": machine.cpu_model(), "threads": torch.get_num_threads(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "environment": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}
