import pyro
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Modules whose tests build no EM of their own default, or choose jit themselves.
_ONE_WAY = {"test_docs", "test_benchmarks", "test_examples", "test_kernels", "test_program"}


def pytest_addoption(parser):
    parser.addoption(
        "--jit", choices=["both", "true", "false"], default="both",
        help="run each test that builds an EM with EM's default jit=True, jit=False, or both "
             "(the default: the captured programs and the Python model must fit alike)")


def pytest_generate_tests(metafunc):
    """Every test runs with EM(..., jit=True) and EM(..., jit=False) as default (``--jit``),
    except in modules that choose it themselves and tests marked ``jit_only`` (of fused
    chains and captured programs, which jit=False does not use): those run with jit=True."""
    if "_jit_default" not in metafunc.fixturenames:
        return
    option = metafunc.config.getoption("--jit")
    modes = {"both": [True, False], "true": [True], "false": [False]}[option]
    if metafunc.module.__name__ in _ONE_WAY or metafunc.definition.get_closest_marker("jit_only"):
        modes = [True]
    metafunc.parametrize("_jit_default", modes, ids=[f"jit={m}" for m in modes], indirect=True)


@pytest.fixture(autouse=True)
def _jit_default(request, monkeypatch):
    """EM's default ``jit`` for the test (see ``--jit``). Every step program is captured at its
    second run (``CAPTURE_AT_ONCE``; a fit captures only where the capture is repaid, hundreds
    of runs later), so every test model's captured steps are checked against the test's
    reference; ``test_program`` checks the policy itself."""
    import pyro_em.program
    from pyro_em import EM

    jit = getattr(request, "param", True)
    monkeypatch.setitem(EM.__init__.__kwdefaults__, "jit", jit)
    if "capture_policy" not in request.keywords:
        monkeypatch.setattr(pyro_em.program, "CAPTURE_AT_ONCE", True)
    return jit


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Each test starts from an empty param store, a fixed seed and float64 defaults."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
    pyro.clear_param_store()


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
