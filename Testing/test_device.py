"""The out-of-memory fall-back (forced errors on the CPU), device resolution and option validation."""

import pytest
import torch

from isseg import cli
from isseg.device import Attempt, memory_fallback_attempts, resolve_device, with_memory_fallback
from isseg.errors import BadInputError, OutOfMemoryError
from isseg.protocol import EXIT_USAGE
from isseg.refinement import RefineSettings

CPU = torch.device("cpu")
GPU_LIKE = [Attempt(CPU), Attempt(CPU, True, "lighter settings"), Attempt(CPU, True, "the CPU")]


def test_out_of_memory_retries_lighter_then_on_the_cpu():
    tried, warnings = [], []

    def compute(attempt):
        tried.append(attempt)
        if len(tried) < 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (forced)")
        return "result"

    assert with_memory_fallback(compute, GPU_LIKE, warnings.append) == "result"
    assert tried == GPU_LIKE
    assert warnings == ["Out of GPU memory: starting again with lighter settings.",
                        "Out of GPU memory: starting again with the CPU."]


def test_out_of_memory_everywhere_is_an_out_of_memory_error():
    def compute(attempt):
        raise torch.cuda.OutOfMemoryError("forced")

    with pytest.raises(OutOfMemoryError, match="lightest settings"):
        with_memory_fallback(compute, GPU_LIKE, lambda message: None)


def test_host_memory_error_is_not_retried():
    tried = []

    def compute(attempt):
        tried.append(attempt)
        raise MemoryError()

    with pytest.raises(OutOfMemoryError):
        with_memory_fallback(compute, GPU_LIKE, lambda message: None)
    assert len(tried) == 1


def test_attempts_per_device():
    assert memory_fallback_attempts(CPU) == [Attempt(CPU)]
    cuda = torch.device("cuda")
    assert [(a.device.type, a.lighter) for a in memory_fallback_attempts(cuda)] == [
        ("cuda", False), ("cuda", True), ("cpu", True)]


def test_lighter_settings_leave_the_original_alone():
    settings = RefineSettings()
    lighter = settings.lighter()
    assert lighter.alignment.batch_size == 1 and lighter.patches.batch_size == 1
    assert settings.patches.batch_size == RefineSettings().patches.batch_size
    assert lighter.steps == settings.steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when there is no GPU")
def test_cuda_without_a_gpu_is_bad_input():
    with pytest.raises(BadInputError, match="--device auto or cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == CPU


@pytest.mark.parametrize("option", [["--momentum", "1"], ["--steps", "0"], ["--update-every", "0"],
                                    ["--stop-when-converged", "1.5"]])
def test_out_of_range_refine_options_are_usage_errors(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["refine", "--input", "x.nrrd", "--model", "demo", "--output", str(tmp_path), *option])
    assert stopped.value.code == EXIT_USAGE
    assert option[0] in capsys.readouterr().err
