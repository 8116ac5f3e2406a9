"""Step programs (pyro_em.program): a step's closed-form stage and the gradient M-step's ``Q``,
captured once by ``make_fx`` and run as a graph, give the iterates of EM(model, jit=False),
which runs the Python model at every step (Pyro's own examples, scikit-learn's problems); what
cannot be captured faithfully keeps running in Python, and says why."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import pyro_em.program as program
import pyro_models as M
from pyro_em import EM


def fit(make, args, steps, jit, which="q", **options):
    """Params after ``steps`` EM steps of the model ``make()`` with ``jit`` on or off, and the
    state of each batch's program ``which`` (``"q"`` or ``"step"``)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    em = EM(make(), jit=jit, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = [em.step(*args) for _ in range(steps)]
    params = {name: p.detach().clone() for name, p in pyro.get_param_store().items()}
    held = [getattr(pb, which) for pb in em._planner.plans.entries().values()]
    return params, losses, [h.program.state for h in held if h is not None], [h.program.status for h in held if h is not None]


def assert_same_fit(make, args, steps, state, which="q", **options):
    """The program reaches ``state`` and the iterates equal those of jit=False (the graph runs
    the same operations in the same order: equal to round-off)."""
    eager, eager_losses, _, _ = fit(make, args, steps, False, which, **options)
    captured, losses, states, status = fit(make, args, steps, True, which, **options)
    assert states == [state], status
    assert losses == pytest.approx(eager_losses, rel=1e-12, abs=0)
    for name, value in eager.items():
        torch.testing.assert_close(captured[name], value, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cjs_1", "cjs_2"])
def test_capture_recapture(name):
    """Pyro's CJS models: MAP survival and recapture reach Bernoulli sites through products
    with the enumerated alive state, under masks that grow in place along the chain."""
    assert_same_fit(lambda: getattr(M, name), M.capture_history(), 8, "captured")


def test_neural_hmm():
    """examples/hmm.py's model 7: a pyro.module network's weights are the store's tensors."""
    seq, lengths, args = M.polyphonic()
    assert_same_fit(lambda: M.neural_hmms(seq.shape[-1], args)[1], (seq, lengths, args), 4, "captured",
                    map_space="unconstrained", max_plate_nesting=1)


@pytest.mark.slow
def test_mixed_hmm():
    """examples/mixed_hmm: Gamma, VonMises and Beta emissions and zero-inflation masks, most
    params by L-BFGS."""
    assert_same_fit(lambda: M.mixed_hmm, (M.mixed_hmm_config(N_s=2, N_t=3),), 4, "captured", max_plate_nesting=2)


def regression(read):
    """A mixture of regressions whose Python reads its slope param in the way ``read`` says."""

    def model(x, y):
        w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
        b = pyro.param("b", torch.tensor([1.0, -1.0]))
        s = pyro.param("s", torch.ones(2), constraint=constraints.positive)
        slope = read(b)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("y", dist.Normal(slope[z] * x, s[z]), obs=y)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g)
    y = torch.where(torch.arange(50) % 2 == 0, 2 * x, -x) + 0.1 * torch.randn(50, generator=g)
    return model, (x, y)


def _buffer(b):
    out = torch.zeros(2)
    out += b  # a buffer written by a captured operation: made anew at each run
    return out


def _read_late(b):
    ones = torch.ones(2)
    slope = b + ones
    ones.mul_(2.0)  # a constant changed after an operation read it: the graph keeps the order
    return slope


def _view_changed(b):
    out = b * 1.0
    out[:1].add_(0.5)  # through a view: run although the view itself is never read
    return out


@pytest.mark.parametrize("read, state", [
    (lambda b: b, "captured"),
    (_view_changed, "captured"),
    (lambda b: b if float(b.sum()) < 100 else -b, "failed"),  # Python reads a param's value
    (lambda b: b if bool(b.sum() < 100) else -b, "captured"),  # a guard
    (_buffer, "captured"),
    (lambda b: (torch.randn(2), b)[1], "captured"),  # a draw nothing reads (an init): not drawn again
    (lambda b: b + 0 * torch.rand(2), "failed"),  # a result reads a random draw
    (_read_late, "captured"),
])
def test_python_reading_values(read, state):
    model, args = regression(read)
    assert_same_fit(lambda: model, args, 6, state)


def test_a_graph_that_disagrees_with_the_model_is_dropped(monkeypatch):
    """The first run of a captured graph runs the model too: a wrong graph (here one that adds
    1 to Q) is dropped, says why, and the fit is the model's."""
    capture = program._capture

    def wrong(*args):
        captured = capture(*args)

        def run(*inputs):
            out = captured.graph(*inputs)
            return (out[0] + 1.0, *out[1:])

        return captured._replace(graph=run)

    monkeypatch.setattr(program, "_capture", wrong)
    model, args = regression(lambda b: b)
    assert_same_fit(lambda: model, args, 6, "failed")


def test_float32():
    model, (x, y) = regression(lambda b: b)
    torch.set_default_dtype(torch.float32)
    assert_same_fit(lambda: model, (x.float(), y.float()), 6, "captured")
    assert pyro.param("b").dtype == torch.float32


def bernoulli_mixture(images):
    weights = pyro.param("weights", torch.ones(4) / 4, constraint=constraints.simplex)
    templates = pyro.param("templates", torch.linspace(0.3, 0.7, 4 * 64).reshape(4, 64),
                           constraint=constraints.unit_interval)
    with pyro.plate("images", len(images)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Bernoulli(templates[z]).to_event(1), obs=images)


def digits():
    from sklearn.datasets import load_digits

    return (torch.as_tensor(load_digits().data[:300]) > 7).double()


def gmm(cov_type):
    from test_sklearn_parity import initial_covariances, make_problem, pyro_gmm

    X, weights, means = make_problem()
    return pyro_gmm(cov_type, weights, means, initial_covariances(cov_type)), X


def test_closed_form_steps_captured_on_mixtures():
    """The digits Bernoulli mixture and scikit-learn's full-covariance problem: the fused
    closed-form stage is captured, with the iterates of jit=False (reg_covar as scikit-learn's)."""
    assert_same_fit(lambda: bernoulli_mixture, (digits(),), 8, "captured", "step")
    model, X = gmm("full")
    assert_same_fit(lambda: model, (X,), 8, "captured", "step", reg_covar=1e-3)


def test_closed_form_steps_captured_on_pyro_hmms():
    """examples/hmm.py's model 1 (pyro.markov, sequences that end), with its Dirichlet and
    Beta priors: MAP pseudo-counts in the captured solves."""
    seq, lengths, args = M.polyphonic(num_sequences=8, max_length=12)
    assert_same_fit(lambda: M.hmm_1, (seq, lengths, args), 8, "captured", "step",
                    max_plate_nesting=2, map_space="unconstrained")


def hmm_problem(S, T, M):
    """``S`` sequences of ``T`` symbols out of ``M``, and a function that makes a 3-state
    HMM's start, transition and emission params."""
    g = torch.Generator().manual_seed(0)
    X, emit0 = torch.randint(M, (S, T), generator=g), torch.rand(3, M, generator=g) + 0.5

    def params():
        start = pyro.param("start", torch.ones(3) / 3, constraint=constraints.simplex)
        trans = pyro.param("trans", torch.eye(3) * 0.5 + 1 / 6, constraint=constraints.simplex)
        return start, trans, pyro.param("emit", emit0, constraint=constraints.simplex)

    return X, params


def markov_hmm(params):
    """A categorical HMM written with pyro.markov over sequences ``X`` (S, T)."""

    def model(X):
        start, trans, emit = params()
        with pyro.plate("seqs", X.shape[0]):
            z = None
            for t in pyro.markov(range(X.shape[1])):
                z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]))
                pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=X[:, t])

    return model


def test_closed_form_steps_captured_on_long_chains():
    """A pyro.markov HMM long enough for the blocked forward-backward, whose buffers (an
    identity-padded stack of transitions) are made by factories and written by captured
    operations: each run makes them anew."""
    X, params = hmm_problem(4, 150, 5)
    assert_same_fit(lambda: markov_hmm(params), (X,), 6, "captured", "step")


def test_a_changed_setting_captures_again():
    """reg_covar enters the captured solves as a number: changing it between steps gives the
    Python step at the new value."""
    model, X = gmm("full")
    runs = {}
    for jit in (False, True):
        pyro.clear_param_store()
        em = EM(model, reg_covar=1e-3, jit=jit)
        for _ in range(5):
            em.step(X)
        em.reg_covar = 0.5
        runs[jit] = [em.step(X) for _ in range(3)], pyro.param("scale_tril").detach().clone()
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-12)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-10, atol=1e-12)


def test_a_guard_that_fails_runs_in_python():
    """A boolean that Python read in the captured run is a guard, returned by the graph: where
    it comes out otherwise, the call runs in Python (and takes the other branch)."""

    def f(x):
        return (x * 2 if bool((x > 0).all()) else x * 3,)

    p = program.Program()
    for x in [torch.ones(3), torch.ones(3) * 2, torch.ones(3) * 3, torch.ones(3) * 4]:
        assert torch.equal(p([x], lambda: f(x))[0], x * 2)
    assert p.state == "captured" and p.guards.tolist() == [True]
    x = -torch.ones(3)
    assert torch.equal(p([x], lambda: f(x))[0], x * 3)
    assert p.state == "captured"  # (kept for the next run)


def test_a_read_of_a_number_is_not_captured():
    p = program.Program()
    for x in [torch.ones(3), torch.ones(3) * 2, torch.ones(3) * 3]:
        assert torch.equal(p([x], lambda: (x * float(x.sum()),))[0], x * float(x.sum()))
    assert p.state == "failed" and "reads a number" in p.status


def test_constants_are_folded():
    """Work on constants (the data) is done once, at capture: the graph holds its result."""
    data = torch.arange(6.0)
    p = program.Program()
    for i in range(3):
        x = torch.tensor(float(i))
        assert torch.equal(p([x], lambda: (data.exp().sum() * x,))[0], data.exp().sum() * x)
    assert p.state == "captured" and p.ops == 1  # (the mul)


def test_traced_closed_form_steps_captured(monkeypatch):
    """A model that does not fuse (one DiscreteHMM site, as bench_hmm's vectorized form): the
    captured stage holds the model's enumeration and the E-step's backward pass as plain
    operations, with the eager iterates."""
    monkeypatch.setattr(program, "CAPTURE_AT_ONCE", True)
    X, params = hmm_problem(6, 40, 4)

    def model(X):
        start, trans, emit = params()
        with pyro.plate("seqs", X.shape[0]):
            pyro.sample("x", dist.DiscreteHMM(start.log(), trans.log(), dist.Categorical(emit)), obs=X)

    assert_same_fit(lambda: model, (X,), 6, "captured", "step")


def test_closed_form_stage_captured_beside_a_gradient_m_step(monkeypatch):
    """A mixture of regressions: weights and scales in closed form, slopes by Newton. The
    captured stage gives the E-step's weights too, for the captured Q: the iterates of jit=False."""
    monkeypatch.setattr(program, "CAPTURE_AT_ONCE", True)
    model, args = regression(lambda b: b)
    assert_same_fit(lambda: model, args, 8, "captured", "step")
    assert fit(lambda: model, args, 8, True)[2] == ["captured"]  # and Q


@pytest.mark.slow
def test_compiled_graphs_give_the_same_fit():
    """EM(model, compile=True): the captured stage compiled by torch.compile (inductor), in
    float32 (the digits Bernoulli mixture), gives the losses of the graph module to
    round-off, without warnings."""
    torch.set_default_dtype(torch.float32)
    images, runs = digits().float(), {}
    for option in (False, True):
        pyro.clear_param_store()
        em = EM(bernoulli_mixture, compile=option)
        runs[option] = [em.step(images) for _ in range(6)]
        assert str(em.plan).splitlines()[-1].endswith(", compiled)" if option else " ops)")
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
    assert pyro.param("templates").dtype == torch.float32


def test_a_capture_reads_nothing_kept_before_it(monkeypatch):
    """What a step kept for its later parts (pyro_em.memo: the data's feature-major copy) is
    not read by a capture: a graph whose data is an input would hold it as a constant."""
    from pyro_em import kernels, memo

    x, other = torch.randn(6, 2), torch.randn(6, 2)
    monkeypatch.setattr(program, "CAPTURE_AFTER", 0)
    captured = program.Program(False)
    with memo.scope({}):
        kernels.feature_major(x)  # (kept)
        assert captured([x], lambda: (kernels.feature_major(x) * 2,))[0].equal(x.T * 2)
    assert captured.state == "captured"
    assert captured([other], lambda: (kernels.feature_major(other) * 2,))[0].equal(other.T * 2)


def test_options_are_checked():
    with pytest.raises(ValueError, match="compile must be"):
        EM(lambda: None, compile="fast")
    with pytest.raises(ValueError, match="hmm_algorithm must be"):
        EM(lambda: None, hmm_algorithm="fastest")


@pytest.mark.parametrize("which", ["gmm", "hmm"])
def test_steps_over_batches_run_captured_summaries(which, monkeypatch):
    """step_batches over a list of batches: every batch's E-step and statistics run as its
    captured graph, with the iterates of jit=False; a full-covariance mixture takes two passes
    (the covariance reads the new means). (The batches after the first share its plan and are
    traced.)"""
    monkeypatch.setattr(program, "CAPTURE_AT_ONCE", True)
    if which == "gmm":
        model, X = gmm("full")
        batches = [(x,) for x in X.split(len(X) // 4)]
    else:
        X, params = hmm_problem(8, 30, 4)
        model, batches = markov_hmm(params), [(x,) for x in X.split(2)]
    runs = {}
    for jit in (False, True):
        pyro.clear_param_store()
        em = EM(model, jit=jit)
        losses = [em.step_batches(batches) for _ in range(5)]
        runs[jit] = losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-12)
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-10, atol=1e-12)
    held = [p.program.state for pb in em._planner.plans.entries().values() for p in pb.summaries.values()]
    assert held and set(held) == {"captured"}
    assert len({key[0] for pb in em._planner.plans.entries().values() for key in pb.summaries}) == (2 if which == "gmm" else 1)
    assert str(em.plan).splitlines()[-1].startswith(f"pass {2 if which == 'gmm' else 1} over batches, each batch: captured graph (")



@pytest.mark.parametrize("how", ["fresh batches", "online"])
def test_new_tensors_each_step_run_graphs_shared_by_their_shapes(how, monkeypatch):
    """A DataLoader's batches (new tensors at every pass) and OnlineEM's steps: the batches
    that run another batch's plan share their graphs by shapes, with the data among the
    graph's inputs (and OnlineEM's running statistics and step size), so every batch's E-step
    and statistics (OnlineEM: its whole step) run captured, with the iterates of jit=False (a
    batch's data baked into a graph would give another batch's)."""
    from test_batches import _FreshBatches

    from pyro_em import OnlineEM

    monkeypatch.setattr(program, "CAPTURE_AT_ONCE", True)
    model, X = gmm("full")
    runs = {}
    for jit in (False, True):
        pyro.clear_param_store()
        if how == "online":
            em = OnlineEM(model, jit=jit, decay=0.7)
            steps = [em.step_batches(_FreshBatches(X.roll(50 * k, 0), size=len(X) // 4)) for k in range(4)]
        else:
            em = EM(model, jit=jit)
            steps = [em.step_batches(_FreshBatches(X, size=len(X) // 4)) for _ in range(5)]
        runs[jit] = steps, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-12)
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-10, atol=1e-12)
    if how == "online":
        (step,) = em._planner._shared_steps.values()  # (one shape of batch)
        assert step.program.state == "captured"
    else:
        (shared,) = em._planner._shared_summaries.values()
        assert shared and {p.program.state for p in shared.values()} == {"captured"}


def test_restarts_keep_their_graphs(monkeypatch):
    """fit(n_init=3) with runs one after another (a callback reads each run's params): the
    step is captured once, and each restart's graph run is checked again against Python (new
    values); the runs equal those of jit=False."""
    model, X = gmm("full")
    captures, capture = [], program._capture
    monkeypatch.setattr(program, "_capture", lambda *a: captures.append(1) or capture(*a))
    results = {}
    for jit in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = EM(model, reg_covar=1e-3, jit=jit).fit(X, n_init=3, max_iter=10, callback=lambda i, loss: None)
        assert result.restarts.startswith("one after another")
        results[jit] = result.run_losses
    assert len(captures) == 1
    assert results[True] == pytest.approx(results[False], rel=1e-10)


# ---- when a fit captures: only where the capture is repaid --------------------------------


@pytest.mark.capture_policy
def test_a_mixture_captures_at_the_run_its_counts_say(monkeypatch):
    """A fused mixture's stage counts the operations of its second run and is captured at the
    first run ``r`` with ``r * ops * EAGER_COST_PER_OP >= REPAY * capture cost``: the same
    run on any machine (REPAY lowered here, so that the test is short)."""
    monkeypatch.setattr(program, "REPAY", 0.05)
    monkeypatch.setattr(program, "_captured_in_process", [True])  # (no imports to pay)
    model, X = gmm("full")
    em = EM(model, reg_covar=1e-3)
    states = []
    for _ in range(40):
        em.step(X)
        held = em._planner.latest.step.program
        states.append(held.state)
    ops = held.eager_ops
    due = next(r for r in range(1, 1000) if program.repaid(r, ops, "mixture"))
    assert due >= 2 and states.index("captured") == due  # (step due + 1 captures: due runs in Python)
    assert ops > 100 and states[-1] == "captured"


@pytest.mark.capture_policy
def test_short_fits_capture_nothing_and_a_chain_never():
    """At the default costs a 30-step fit of a mixture captures nothing (its capture would
    cost more than a tenth of the fit), nor does a fused chain at any length (its graph runs
    no faster than its Python)."""
    model, X = gmm("full")
    em = EM(model, reg_covar=1e-3)
    for _ in range(30):
        em.step(X)
    assert em._planner.latest.step.program.state == "eager"
    assert "closed-form stage: Python (not captured yet)" in str(em.plan)
    X, params = hmm_problem(4, 20, 3)
    em = EM(markov_hmm(params))
    for _ in range(40):
        em.step(X)
    held = em._planner.latest.step.program
    assert held.state == "eager" and not program.repaid(10**6, held.eager_ops, "chain")
    assert "closed-form stage: Python (a fused chain: its graph would run no faster)" in str(em.plan)


@pytest.mark.capture_policy
def test_a_fresh_process_short_fit_pays_no_capture():
    """A fresh process's short fits, a mixture and a chain, capture nothing, so they pay
    neither make_fx's 0.4-1 ms per operation nor its first imports. (PyTorch itself imports
    torch._dynamo at a process's first distribution: torch 2.13's ``Categorical`` and
    ``StickBreakingTransform`` call through ``torch._disable_dynamo``, in any Pyro program.)"""
    import subprocess
    import sys

    code = """
import torch, pyro, pyro.distributions as dist
from torch.distributions import constraints
import pyro_em.program
from pyro_em import EM
def mixture(data):
    w = pyro.param("w", torch.ones(2) / 2, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)
def chain(data):
    trans = pyro.param("trans", torch.tensor([[0.9, 0.1], [0.2, 0.8]]), constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    z = 0
    for t in pyro.markov(range(len(data))):
        z = pyro.sample(f"z_{t}", dist.Categorical(trans[z]), infer={"enumerate": "parallel"})
        pyro.sample(f"x_{t}", dist.Normal(locs[z], 1.0), obs=data[t])
for model in (mixture, chain):
    pyro.clear_param_store()
    EM(model).fit(torch.randn(50), max_iter=30, tol=0.0)
print(pyro_em.program._captured_in_process[0])
"""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout
