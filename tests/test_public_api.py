from types import ModuleType

import gpuguard
import gpuguard.fakenvml


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n, v in vars(gpuguard).items() if not n.startswith("_") and not isinstance(v, ModuleType)}
    assert set(gpuguard.__all__) == public | {"__version__"}


def test_every_exported_name_resolves() -> None:
    for module in (gpuguard, gpuguard.fakenvml):
        for name in module.__all__:
            assert getattr(module, name) is not None, name


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(gpuguard, n) for n in gpuguard.__all__ if n.endswith("Error")]
    assert errors
    for cls in errors:
        assert issubclass(cls, gpuguard.GpuGuardError), cls
