from types import ModuleType

import gpuguard
import gpuguard.fakenvml


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n in dir(gpuguard) if not n.startswith("_") and not isinstance(getattr(gpuguard, n), ModuleType)}
    assert set(gpuguard.__all__) == public | {"__version__"}


def test_the_health_command_line_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, gpuguard.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_exported_name_resolves() -> None:
    for module in (gpuguard, gpuguard.fakenvml):
        for name in module.__all__:
            assert getattr(module, name) is not None, name


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(gpuguard, n) for n in gpuguard.__all__ if n.endswith("Error")]
    assert errors
    for cls in errors:
        assert issubclass(cls, gpuguard.GpuGuardError), cls
