"""What a model file and a report record of the computer: CPU, threads, kernel variables; and
portable numerics, which make a run independent of the CPU's instruction set."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from vaeuda import machine
from vaeuda.cli import main
from vaeuda.errors import VaeudaError
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
    # as Linux writes it: the numeric "model" line comes before "model name"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: Test\nmodel\t\t: 85\nmodel name\t: Test CPU 9000 @ 1.00GHz\n"
                       "flags\t: fpu\n")
    monkeypatch.setattr(machine, "CPUINFO", cpuinfo)
    assert machine.cpu_model() == "Test CPU 9000 @ 1.00GHz"
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    assert machine.cpu_model() == "x86_64"
    monkeypatch.setattr(machine.platform, "processor", lambda: "i386")     # platform's processor first, where it knows one
    assert machine.cpu_model() == "i386"


def test_numerics_names_the_threads_and_only_the_kernel_variables_that_are_set(no_kernel_variables):
    monkeypatch = no_kernel_variables
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")                        # read at start-up only: changes nothing here
    monkeypatch.setenv("HOME", "/home/someone")                       # not a kernel variable
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        numerics, line, again = machine.numerics(), machine.description(), machine.fingerprint()
    finally:
        torch.set_num_threads(threads)
    assert numerics["environment"] == {"OMP_NUM_THREADS": "3", "MKL_CBWR": "COMPATIBLE"}
    assert numerics["threads"] == 1 and numerics["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert numerics["fingerprint"] == again                         # the same process and threads round alike
    if threads > 1:                                                 # another thread count splits the sums otherwise
        assert machine.fingerprint()["reduce"] != again["reduce"]
    assert line.endswith(f", 1 thread, {numerics['cpu_capability']} kernels, OMP_NUM_THREADS=3, MKL_CBWR=COMPATIBLE, "
                         f"kernel fingerprint {again['all']}")
    assert line.startswith(machine.cpu_model() + ", ") and numerics["portable"] is False
    monkeypatch.setattr(machine, "portable", lambda: True)
    assert machine.numerics()["portable"] is True
    assert ", MKL_CBWR=COMPATIBLE, portable numerics, kernel fingerprint " in machine.description()


def test_a_model_file_records_the_numerics_it_was_trained_with(tiny_cohort, tmp_path, no_kernel_variables):
    no_kernel_variables.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")                  # recorded (set too late to change kernels here)
    out = tmp_path / "src.safetensors"
    train_source([tiny_cohort / "mr_1001_image.nii.gz"], [tiny_cohort / "mr_1001_label.nii.gz"], out, preset="tiny",
                 iterations=1, seed=0, device="cpu")
    recorded = load_model(out)[1]["provenance"]["numerics"]
    assert recorded == {"cpu": machine.cpu_model(), "threads": torch.get_num_threads(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "environment": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "portable": False,
                        "fingerprint": machine.fingerprint()}


def test_the_fingerprint_names_each_computation_and_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    prints = machine.fingerprint()
    assert torch.equal(torch.rand(3), expected)                  # training's draws are not shifted
    assert set(prints) == {"gemm", "conv_train", "conv_inference", "dilated", "norm", "math", "random",
                           "resample", "reduce", "all"}
    assert all(len(v) == 12 and int(v, 16) >= 0 for v in prints.values())
    assert len(set(prints.values())) == len(prints)             # each entry digests its own computation


def test_portable_numerics_refuse_a_conflicting_variable_and_change_nothing(no_kernel_variables):
    no_kernel_variables.setenv("MKL_CBWR", "AVX2")
    threads = torch.get_num_threads()
    with pytest.raises(VaeudaError, match=r"need MKL_CBWR=COMPATIBLE,STRICT, but the environment sets MKL_CBWR=AVX2\."):
        machine.use_portable_numerics()
    assert os.environ["MKL_CBWR"] == "AVX2" and "ATEN_CPU_CAPABILITY" not in os.environ
    assert torch.backends.mkldnn.enabled and torch.get_num_threads() == threads


def test_portable_numerics_need_the_variables_exactly_as_the_libraries_read_them(no_kernel_variables):
    """MKL ignores a lower-case MKL_CBWR: accepting it recorded portable: true for a run that was not."""
    no_kernel_variables.setenv("MKL_CBWR", "compatible,strict")
    no_kernel_variables.setenv("ATEN_CPU_CAPABILITY", "default")
    with pytest.raises(VaeudaError, match="need MKL_CBWR=COMPATIBLE,STRICT, but the environment sets "
                                          "MKL_CBWR=compatible,strict"):
        machine.use_portable_numerics()
    assert not machine.portable()


def test_oneDNNs_older_variable_name_is_recorded_too(no_kernel_variables):
    no_kernel_variables.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert machine.kernel_environment() == {"DNNL_MAX_CPU_ISA": "AVX2"}
    # every kernel variable is recorded, the last of the list too (nothing computes while they are set)
    for name in machine.KERNEL_VARIABLES:
        no_kernel_variables.setenv(name, f"value of {name}")
    assert machine.kernel_environment() == {name: f"value of {name}" for name in machine.KERNEL_VARIABLES}


def test_the_fingerprint_is_the_same_under_no_grad():
    """Its training convolution needs gradients: a caller in no_grad or inference mode got a RuntimeError."""
    expected = machine.fingerprint()
    with torch.no_grad():
        assert machine.fingerprint() == expected
    with torch.inference_mode():
        assert machine.fingerprint() == expected


def test_portable_numerics_cannot_start_once_torch_runs_without_them(no_kernel_variables, monkeypatch):
    threads = torch.get_num_threads()
    # torch is imported here, and MKL may have read its variables already: only the user can set them.
    with pytest.raises(VaeudaError, match="before torch is imported: start Python with "
                                          "MKL_CBWR=COMPATIBLE,STRICT ATEN_CPU_CAPABILITY=default"):
        machine.use_portable_numerics()
    assert not any(name in os.environ for name in machine.PORTABLE_ENVIRONMENT)
    # One of the two set by the user is not enough either: the other would be set too late.
    monkeypatch.setenv("MKL_CBWR", machine.PORTABLE_ENVIRONMENT["MKL_CBWR"])
    with pytest.raises(VaeudaError, match="before torch is imported"):
        machine.use_portable_numerics()
    assert "ATEN_CPU_CAPABILITY" not in os.environ
    # Both set, but torch chose its vector kernels before ATEN_CPU_CAPABILITY was set.
    for name, value in machine.PORTABLE_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.raises(VaeudaError, match="torch had already chosen its AVX2 kernels"):
        machine.use_portable_numerics()
    assert torch.backends.mkldnn.enabled and torch.get_num_threads() == threads
    assert not machine.portable() and machine.numerics()["portable"] is False


def _restoring_torch_settings(test):
    """Runs ``test()`` and puts back what use_portable_numerics changes in this process."""
    mkldnn, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    nnpack = torch._C._get_nnpack_enabled() if hasattr(torch._C, "_get_nnpack_enabled") else None
    try:
        test()
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        torch.set_num_threads(threads)
        if nnpack is not None:
            torch._C._set_nnpack_enabled(nnpack)


def test_portable_numerics_take_torchs_older_name_for_its_baseline_kernels(no_kernel_variables, portable_torch):
    """torch before 2.9 called its x86 baseline kernels "NO AVX": portable runs were refused there."""
    for name, value in machine.PORTABLE_ENVIRONMENT.items():
        no_kernel_variables.setenv(name, value)
    no_kernel_variables.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NO AVX")

    def check():
        machine.use_portable_numerics()
        assert machine.portable() and not torch.backends.mkldnn.enabled
        assert torch.get_num_threads() == machine.PORTABLE_THREADS
        # each setting counts: oneDNN back on, or another thread count, is no longer portable
        torch.backends.mkldnn.enabled = True
        assert not machine.portable()
        torch.backends.mkldnn.enabled = False
        torch.set_num_threads(machine.PORTABLE_THREADS + 1)
        assert not machine.portable()
    _restoring_torch_settings(check)


def test_portable_numerics_are_refused_by_a_torch_without_an_nnpack_switch(no_kernel_variables):
    """torch 2.1 and 2.2 cannot turn NNPACK off: one sentence, and nothing changed."""
    for name, value in machine.PORTABLE_ENVIRONMENT.items():
        no_kernel_variables.setenv(name, value)
    no_kernel_variables.setitem(sys.modules, "torch.backends.nnpack", None)     # import raises ImportError
    no_kernel_variables.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    threads = torch.get_num_threads()
    with pytest.raises(VaeudaError, match=r"^Portable numerics need torch 2\.3 or later, which can switch "
                                          r"NNPACK's kernels off; this is torch " + re.escape(torch.__version__)):
        machine.use_portable_numerics()
    assert torch.backends.mkldnn.enabled and torch.get_num_threads() == threads
    # Nor does such a torch count as portable when the rest is set by hand (it has no NNPACK getter either).
    no_kernel_variables.delattr(torch._C, "_get_nnpack_enabled", raising=False)

    def check():
        torch.backends.mkldnn.enabled = False
        torch.set_num_threads(machine.PORTABLE_THREADS)
        assert machine.portable() is False
    _restoring_torch_settings(check)


def test_portable_runs_on_a_gpu_or_in_bf16_are_refused_before_anything_runs(tiny_cohort, tmp_path, capsys):
    image = str(tiny_cohort / "mr_1001_image.nii.gz")
    assert main(["train-source", "--portable", "--device", "cuda", "--preset", "tiny", "--iterations", "1",
                 "--out", str(tmp_path / "m.safetensors"), "--progress", "none", image]) == 2
    assert "--portable is for the CPU; it cannot be combined with --device cuda." in capsys.readouterr().err
    assert main(["segment", "--portable", "--cpu-bf16", "--model", str(tmp_path / "m.safetensors"),
                 "--out", str(tmp_path / "seg"), "--progress", "none", image]) == 2
    assert "--portable computes in float32; it cannot be combined with --cpu-bf16." in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert torch.backends.mkldnn.enabled                    # this process was left as it was


# Train, adapt and segment in one fresh process (portable numerics hold for the rest of a process).
PIPELINE = """
import sys
from vaeuda.cli import main
cohort, out, portable = sys.argv[1], sys.argv[2], sys.argv[3:]
common = ["--progress", "none", *portable]
assert main(["train-source", "--preset", "tiny", "--iterations", "3", "--out", out + "/source.safetensors",
             *common, cohort + "/mr_1001_image.nii.gz"]) == 0
assert main(["adapt", "--model", out + "/source.safetensors", "--iterations", "2", "--out", out + "/adapted.safetensors",
             *common, cohort + "/ct_1001_image.nii.gz"]) == 0
assert main(["segment", "--model", out + "/adapted.safetensors", "--out", out + "/seg", *common,
             cohort + "/ct_1002_image.nii.gz"]) == 0
"""

# What another CPU would do differently, simulated on this one: MKL without AVX / AVX2 / AVX-512,
# oneDNN without AVX-512, one thread.
OTHER_CPU = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}


def _kernel_free_environment(**extra) -> dict:
    """This process's environment without any of machine.KERNEL_VARIABLES, plus ``extra``: a child's."""
    return {**{k: v for k, v in os.environ.items() if k not in machine.KERNEL_VARIABLES}, **extra}


def _pipeline(cohort, out, portable: bool, extra_env: dict) -> dict:
    env = _kernel_free_environment(**extra_env)
    out.mkdir()
    subprocess.run([sys.executable, "-c", PIPELINE, str(cohort), str(out)] + (["--portable"] if portable else []),
                   env=env, check=True, capture_output=True, text=True)
    result = {name: load_file(out / f"{name}.safetensors") for name in ("source", "adapted")}
    result["labels"] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "seg" / "ct_1002_image_seg.nii.gz")))
    result["numerics"] = load_model(out / "adapted.safetensors")[1]["provenance"]["numerics"]
    return result


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_portable_numerics_give_the_same_models_and_labels_under_another_cpus_kernels(tiny_cohort, tmp_path,
                                                                                    portable_torch):
    """The check that can be made on one CPU: its other kernel paths change a default run's weights,
    and a portable run's weights and labels not at all (bit for bit)."""
    here = _pipeline(tiny_cohort, tmp_path / "here", True, {})
    there = _pipeline(tiny_cohort, tmp_path / "there", True, OTHER_CPU)
    assert _same(here["source"], there["source"]) and _same(here["adapted"], there["adapted"])
    assert np.array_equal(here["labels"], there["labels"])
    assert here["numerics"]["portable"] and there["numerics"]["portable"]
    assert here["numerics"]["threads"] == machine.PORTABLE_THREADS
    assert here["numerics"]["cpu_capability"] in machine.BASELINE_CAPABILITIES
    assert there["numerics"]["environment"] == {**OTHER_CPU, **machine.PORTABLE_ENVIRONMENT}
    assert here["numerics"]["fingerprint"] == there["numerics"]["fingerprint"]
    # Without --portable the same two runs differ: the simulation does change the rounding, and
    # the fingerprints the models record say so (oneDNN's convolutions and the thread count).
    default_here = _pipeline(tiny_cohort, tmp_path / "default_here", False, {})
    default_there = _pipeline(tiny_cohort, tmp_path / "default_there", False, OTHER_CPU)
    assert not _same(default_here["source"], default_there["source"])
    assert not default_here["numerics"]["portable"]
    prints_here, prints_there = default_here["numerics"]["fingerprint"], default_there["numerics"]["fingerprint"]
    assert prints_here["conv_train"] != prints_there["conv_train"] and prints_here["all"] != prints_there["all"]


# Under portable numerics, segment a tiny model's slices 16 at a time and 8 at a time.
BATCHES = """
import sys
from vaeuda import machine
machine.use_portable_numerics()
import torch
from vaeuda.modelfile import load_model
net, _ = load_model(sys.argv[1])
x = torch.randn(16, net.cfg.in_channels, net.cfg.input_size, net.cfg.input_size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    whole, halves = net.segment_logits(x, "source"), torch.cat([net.segment_logits(x[:8], "source"),
                                                                net.segment_logits(x[8:], "source")])
assert machine.portable()
print(torch.equal(whole, halves), float((whole - halves).abs().max()))
"""


def test_portable_inference_does_not_depend_on_the_batch_size(tiny_source_model, portable_torch):
    """torch hands batches of 16 and more to NNPACK, whose sums are blocked by the CPU's cache sizes
    (and which needs AVX2); portable numerics switch it off, so `segment --batch-size` cannot
    change a portable result."""
    run = subprocess.run([sys.executable, "-c", BATCHES, str(tiny_source_model)], env=_kernel_free_environment(),
                         check=True, capture_output=True, text=True)
    assert run.stdout.split()[0] == "True", run.stdout


def test_the_numerics_command_prints_this_computers_numerics(capsys, no_kernel_variables):
    assert main(["numerics"]) == 0
    assert json.loads(capsys.readouterr().out) == machine.numerics()
    assert main(["numerics", "--progress", "json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first == {"event": "numerics", "numerics": machine.numerics()}
    # --portable has to start before torch does: in this process it is refused, in one sentence
    assert main(["numerics", "--portable"]) == 2
    assert "Portable numerics must be chosen before torch is imported" in capsys.readouterr().err
