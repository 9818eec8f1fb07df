import pynvml
import pytest

from gpuguard import GpuGuardError, NvmlError, NvmlUnavailableError
from gpuguard.health._nvml_errors import UNAVAILABLE_CODES, translate

CODES = sorted(
    (name, getattr(pynvml, name))
    for name in dir(pynvml)
    if name.startswith("NVML_ERROR_") and isinstance(getattr(pynvml, name), int)
)


@pytest.mark.parametrize(("name", "code"), CODES, ids=[name for name, _ in CODES])
def test_every_nvml_error_code_has_a_translation(name: str, code: int) -> None:
    try:
        source = pynvml.NVMLError(code)
    except ValueError:
        pytest.skip(f"{name} has no pynvml exception class")
    translated = translate(source, "nvmlDeviceGetFieldValues")
    assert isinstance(translated, GpuGuardError)
    if code in UNAVAILABLE_CODES:
        assert isinstance(translated, NvmlUnavailableError)
        assert "NVML is not available" in str(translated)
    else:
        assert isinstance(translated, NvmlError)
        assert translated.code == code
        assert "nvmlDeviceGetFieldValues" in str(translated)


def test_gpu_is_lost_keeps_its_real_code() -> None:
    # One public mock has GPU_IS_LOST = 9; the real value is 15.
    translated = translate(pynvml.NVMLError_GpuIsLost(), "nvmlDeviceGetUUID")
    assert isinstance(translated, NvmlError)
    assert translated.code == 15 == pynvml.NVML_ERROR_GPU_IS_LOST


def test_library_missing_message_says_what_to_do() -> None:
    translated = translate(pynvml.NVMLError_LibraryNotFound(), "nvmlInit")
    assert isinstance(translated, NvmlUnavailableError)
    assert "libnvidia-ml.so.1" in str(translated)
