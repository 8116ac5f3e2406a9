"""Models written the way Pyro's examples and tutorials write them, idioms kept as they are
there: ``include_prior`` masks, sequence-length masks, ``pyro.markov``, ``Vindex``, priors with
concentration below one, MAP sites, local continuous latents. Each has a small synthetic data
maker. Sources: Pyro's examples/hmm.py (models 0-7), examples/capture_recapture/cjs.py
(models 1 and 2), examples/mixed_hmm/model.py, examples/lda.py, the GMM and enumeration
tutorials, tests/infer/test_enum.py (a mixture whose observations are masked by the
enumerated component)."""

from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from torch.distributions import constraints


def polyphonic(num_sequences=6, max_length=7, data_dim=3, hidden_dim=4, seed=0):
    """Binary 'piano rolls' of several lengths, as examples/hmm.py's data after loading."""
    g = torch.Generator().manual_seed(seed)
    sequences = torch.bernoulli(torch.full((num_sequences, max_length, data_dim), 0.4), generator=g)
    lengths = torch.randint(max_length // 2, max_length + 1, (num_sequences,), generator=g)
    lengths[0] = max_length
    for i, n in enumerate(lengths):
        sequences[i, n:] = 0
    return sequences, lengths, SimpleNamespace(hidden_dim=hidden_dim, jit=False, nn_dim=6, nn_channels=2)


# ---- examples/hmm.py ------------------------------------------------------------------------


def hmm_0(sequences, lengths, args, batch_size=None, include_prior=True):
    """Sequences looped over in Python; one tones plate."""
    num_sequences, max_length, data_dim = sequences.shape
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim) + 0.1).to_event(1))
        probs_y = pyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([args.hidden_dim, data_dim]).to_event(2))
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    for i in pyro.plate("sequences", len(sequences), batch_size):
        length = lengths[i]
        sequence = sequences[i, :length]
        x = 0
        for t in pyro.markov(range(length)):
            x = pyro.sample(f"x_{i}_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
            with tones_plate:
                pyro.sample(f"y_{i}_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequence[t])


def hmm_1(sequences, lengths, args, batch_size=None, include_prior=True):
    """Vectorized over sequences, lengths by masks."""
    num_sequences, max_length, data_dim = map(int, sequences.shape)
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim) + 0.1).to_event(1))
        probs_y = pyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([args.hidden_dim, data_dim]).to_event(2))
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        x = 0
        for t in pyro.markov(range(max_length if args.jit else lengths.max())):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                with tones_plate:
                    pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[batch, t])


def hmm_2(sequences, lengths, args, batch_size=None, include_prior=True):
    """Autoregressive emissions: y[t] depends on y[t-1]."""
    num_sequences, max_length, data_dim = map(int, sequences.shape)
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim) + 0.1).to_event(1))
        probs_y = pyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([args.hidden_dim, 2, data_dim]).to_event(3))
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        x, y = 0, 0
        for t in pyro.markov(range(max_length if args.jit else lengths.max())):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                with tones_plate as tones:
                    y = pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[x, y, tones]), obs=sequences[batch, t]).long()


def hmm_3(sequences, lengths, args, batch_size=None, include_prior=True):
    """Factorial HMM: two independent chains w and x share each emission."""
    num_sequences, max_length, data_dim = map(int, sequences.shape)
    hidden_dim = int(args.hidden_dim**0.5)
    with poutine.mask(mask=include_prior):
        probs_w = pyro.sample("probs_w", dist.Dirichlet(0.9 * torch.eye(hidden_dim) + 0.1).to_event(1))
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(hidden_dim) + 0.1).to_event(1))
        probs_y = pyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([hidden_dim, hidden_dim, data_dim]).to_event(3))
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        w, x = 0, 0
        for t in pyro.markov(range(max_length if args.jit else lengths.max())):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                w = pyro.sample(f"w_{t}", dist.Categorical(probs_w[w]), infer={"enumerate": "parallel"})
                x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                with tones_plate as tones:
                    pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[w, x, tones]), obs=sequences[batch, t])


def hmm_4(sequences, lengths, args, batch_size=None, include_prior=True):
    """Partially factorial HMM: x[t] depends on w[t] too, through Vindex."""
    num_sequences, max_length, data_dim = map(int, sequences.shape)
    hidden_dim = int(args.hidden_dim**0.5)
    with poutine.mask(mask=include_prior):
        probs_w = pyro.sample("probs_w", dist.Dirichlet(0.9 * torch.eye(hidden_dim) + 0.1).to_event(1))
        probs_x = pyro.sample(
            "probs_x", dist.Dirichlet(0.9 * torch.eye(hidden_dim) + 0.1).expand_by([hidden_dim]).to_event(2)
        )
        probs_y = pyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([hidden_dim, hidden_dim, data_dim]).to_event(3))
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        w = x = torch.tensor(0, dtype=torch.long)
        for t in pyro.markov(range(max_length if args.jit else lengths.max())):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                w = pyro.sample(f"w_{t}", dist.Categorical(probs_w[w]), infer={"enumerate": "parallel"})
                x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(probs_x)[w, x]), infer={"enumerate": "parallel"})
                with tones_plate as tones:
                    pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[w, x, tones]), obs=sequences[batch, t])


def hmm_6(sequences, lengths, args, batch_size=None, include_prior=False):
    """Second-order HMM with params (no priors), pyro.markov(history=2)."""
    num_sequences, max_length, data_dim = sequences.shape
    hidden_dim = args.hidden_dim
    g = torch.Generator().manual_seed(1)
    probs_x = pyro.param("probs_x", torch.rand(hidden_dim, hidden_dim, hidden_dim, generator=g), constraint=constraints.simplex)
    probs_y = pyro.param("probs_y", torch.rand(hidden_dim, data_dim, generator=g), constraint=constraints.unit_interval)
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        x_curr, x_prev = torch.tensor(0), torch.tensor(0)
        for t in pyro.markov(range(lengths.max()), history=2):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                probs_x_t = Vindex(probs_x)[x_prev, x_curr]
                x_prev, x_curr = x_curr, pyro.sample(f"x_{t}", dist.Categorical(probs_x_t), infer={"enumerate": "parallel"})
                with tones_plate:
                    pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[x_curr.squeeze(-1)]), obs=sequences[batch, t])


class TonesGenerator(torch.nn.Module):
    """examples/hmm.py's emission network: logits of each tone from the state and the
    previous step's tones."""

    def __init__(self, args, data_dim):
        super().__init__()
        self.args, self.data_dim = args, data_dim
        torch.manual_seed(0)
        self.x_to_hidden = torch.nn.Linear(args.hidden_dim, args.nn_dim)
        self.y_to_hidden = torch.nn.Linear(args.nn_channels * data_dim, args.nn_dim)
        self.conv = torch.nn.Conv1d(1, args.nn_channels, 3, padding=1)
        self.hidden_to_logits = torch.nn.Linear(args.nn_dim, data_dim)
        self.relu = torch.nn.ReLU()

    def forward(self, x, y):
        x_onehot = y.new_zeros(x.shape[:-1] + (self.args.hidden_dim,)).scatter_(-1, x, 1)
        y_conv = self.relu(self.conv(y.reshape(-1, 1, self.data_dim))).reshape(y.shape[:-1] + (-1,))
        h = self.relu(self.x_to_hidden(x_onehot) + self.y_to_hidden(y_conv))
        return self.hidden_to_logits(h)


def neural_hmms(data_dim, args):
    """examples/hmm.py's models 5 (pyro.markov) and 7 (one DiscreteHMM) around one network."""
    tones_generator = TonesGenerator(args, data_dim)

    def hmm_5(sequences, lengths, args, batch_size=None, include_prior=True):
        num_sequences, max_length, data_dim = map(int, sequences.shape)
        pyro.module("tones_generator", tones_generator)
        with poutine.mask(mask=include_prior):
            probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim) + 0.1).to_event(1))
        with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
            lengths = lengths[batch]
            x = 0
            y = torch.zeros(data_dim)
            for t in pyro.markov(range(max_length if args.jit else lengths.max())):
                with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                    x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                    with pyro.plate(f"tones_{t}", data_dim, dim=-1):
                        y = pyro.sample(f"y_{t}", dist.Bernoulli(logits=tones_generator(x, y)), obs=sequences[batch, t])

    def hmm_7(sequences, lengths, args, batch_size=None, include_prior=True):
        num_sequences, max_length, data_dim = map(int, sequences.shape)
        pyro.module("tones_generator", tones_generator)
        with poutine.mask(mask=include_prior):
            probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim) + 0.1).to_event(1))
        with pyro.plate("sequences", num_sequences, batch_size, dim=-1) as batch:
            lengths = lengths[batch]
            y = sequences[batch] if args.jit else sequences[batch, : lengths.max()]
            x = torch.arange(args.hidden_dim)
            t = torch.arange(y.size(1))
            init_logits = torch.full((args.hidden_dim,), -float("inf"))
            init_logits[0] = 0
            trans_logits = probs_x.log()
            obs_dist = dist.Bernoulli(logits=tones_generator(x, y.unsqueeze(-2))).to_event(1)
            obs_dist = obs_dist.mask((t < lengths.unsqueeze(-1)).unsqueeze(-1))
            pyro.sample("y", dist.DiscreteHMM(init_logits, trans_logits, obs_dist), obs=y)

    return hmm_5, hmm_7


# ---- examples/capture_recapture/cjs.py ------------------------------------------------------


def capture_history(N=12, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    history = torch.bernoulli(torch.full((N, T), 0.5), generator=g)
    history[torch.arange(N), torch.randint(0, T, (N,), generator=g)] = 1.0  # each seen once
    return history, None


def cjs_1(capture_history, sex):
    N, T = capture_history.shape
    phi = pyro.sample("phi", dist.Uniform(0.0, 1.0))  # survival
    rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))  # recapture
    with pyro.plate("animals", N, dim=-1):
        z = torch.ones(N)
        first_capture_mask = torch.zeros(N).bool()
        for t in pyro.markov(range(T)):
            with poutine.mask(mask=first_capture_mask):
                mu_z_t = first_capture_mask.float() * phi * z + (1 - first_capture_mask.float())
                z = pyro.sample(f"z_{t}", dist.Bernoulli(mu_z_t), infer={"enumerate": "parallel"})
                mu_y_t = rho * z
                pyro.sample(f"y_{t}", dist.Bernoulli(mu_y_t), obs=capture_history[:, t])
            first_capture_mask |= capture_history[:, t].bool()


def cjs_2(capture_history, sex):
    N, T = capture_history.shape
    rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
    z = torch.ones(N)
    first_capture_mask = torch.zeros(N).bool()
    animals_plate = pyro.plate("animals", N, dim=-1)
    for t in pyro.markov(range(T)):
        phi_t = pyro.sample(f"phi_{t}", dist.Uniform(0.0, 1.0)) if t > 0 else 1.0
        with animals_plate, poutine.mask(mask=first_capture_mask):
            mu_z_t = first_capture_mask.float() * phi_t * z + (1 - first_capture_mask.float())
            z = pyro.sample(f"z_{t}", dist.Bernoulli(mu_z_t), infer={"enumerate": "parallel"})
            mu_y_t = rho * z
            pyro.sample(f"y_{t}", dist.Bernoulli(mu_y_t), obs=capture_history[:, t])
        first_capture_mask |= capture_history[:, t].bool()


# ---- tutorials --------------------------------------------------------------------------------

GMM_DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])


@config_enumerate
def gmm_tutorial(data, K=2):
    """The GMM tutorial: Dirichlet(0.5) weights, LogNormal scale, Normal locs."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


@config_enumerate
def gmm_params(data, K=2):
    """The GMM tutorial with params in place of its priors: a plain mixture, which EM steps as a
    fused chain of length one."""
    weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
    scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
    locs = pyro.param("locs", torch.tensor([0.0, 10.0]))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def gmm_batch(data):
    """tests/infer/test_enum.py's vectorized mixture: a OneHotCategorical latent whose probs are
    ``torch.cat([p, 1 - p])`` (p enters through a computation), loc ``(z * mus).sum(-1)``."""
    p = pyro.param("p", torch.tensor([0.3]), constraint=constraints.unit_interval)
    p = torch.cat([p, 1 - p])
    scale = pyro.param("scale", torch.tensor([1.0]), constraint=constraints.positive)
    mus = torch.tensor([-1.0, 1.0])
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.OneHotCategorical(p), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal((z * mus).sum(-1), scale), obs=data)


def param_hmm(data, hidden_dim=3, data_dim=4):
    """The enumeration tutorial's HMM with params in place of its priors (Vindex-indexed
    tables, one sequence): EM steps it as a fused DiscreteHMM."""
    transition = pyro.param("transition", torch.full((hidden_dim, hidden_dim), 1.0) + torch.eye(hidden_dim),
                            constraint=constraints.simplex)
    emission = pyro.param("emission", torch.arange(1.0, 1.0 + hidden_dim * data_dim).reshape(hidden_dim, data_dim),
                          constraint=constraints.simplex)
    x = 0
    for t, y in pyro.markov(enumerate(data)):
        x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(transition)[x]), infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Categorical(Vindex(emission)[x]), obs=y)


def enumeration_hmm(data, data_dim, hidden_dim=3):
    """The enumeration tutorial's HMM: Jeffreys Dirichlet(0.5) priors, one sequence."""
    with pyro.plate("hidden_state", hidden_dim):
        transition = pyro.sample("transition", dist.Dirichlet(0.5 * torch.ones(hidden_dim)))
        emission = pyro.sample("emission", dist.Dirichlet(0.5 * torch.ones(data_dim)))
    x = 0
    for t, y in pyro.markov(enumerate(data)):
        x = pyro.sample(f"x_{t}", dist.Categorical(transition[x]), infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Categorical(emission[x]), obs=y)


def lda(data=None, args=None, batch_size=None):
    """examples/lda.py's model (a fixed vocabulary); doc_topics are local MAP sites here."""
    with pyro.plate("topics", args.num_topics):
        topic_weights = pyro.sample("topic_weights", dist.Gamma(1.0 / args.num_topics, 1.0))
        topic_words = pyro.sample("topic_words", dist.Dirichlet(torch.ones(args.num_words) / args.num_words))
    with pyro.plate("documents", args.num_docs) as ind:
        data = data[:, ind]
        doc_topics = pyro.sample("doc_topics", dist.Dirichlet(topic_weights))
        with pyro.plate("words", args.num_words_per_doc):
            word_topics = pyro.sample("word_topics", dist.Categorical(doc_topics), infer={"enumerate": "parallel"})
            pyro.sample("doc_words", dist.Categorical(topic_words[word_topics]), obs=data)


def lda_data(seed=0):
    args = SimpleNamespace(num_topics=2, num_words=6, num_docs=5, num_words_per_doc=8)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, args.num_words, (args.num_words_per_doc, args.num_docs), generator=g)
    return data, args


def masked_mixture(data, K=3):
    """tests/infer/test_enum.py's hand-written mixture: each component's observation site is
    masked by whether the enumerated component equals it."""
    D = data.shape[-1]
    g = torch.Generator().manual_seed(2)
    mixture_probs = pyro.param("mixture_probs", torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.randn(K, D, generator=g))
    scales = pyro.param("scales", torch.ones(K, D), constraint=constraints.positive)
    with pyro.plate("data", len(data)):
        which = pyro.sample("which", dist.Categorical(mixture_probs), infer={"enumerate": "parallel"})
        for component_ind in range(K):
            with poutine.mask(mask=(which == component_ind)):
                pyro.sample(
                    f"obs_{component_ind}",
                    dist.Normal(locs[component_ind], scales[component_ind]).to_event(1),
                    obs=data,
                )


# ---- examples/mixed_hmm/model.py ------------------------------------------------------------

MISSING = 1e-3


def _index_param(param, ind, dim=-2):
    """Select along ``param``'s dim ``dim`` (an event dim) by the batch index ``ind``."""
    for _ in range(len(param.shape[dim:])):
        ind = ind.unsqueeze(-1)
    inds = [None] * len(param.shape)
    for d, sd in enumerate(reversed(param.shape)):
        inds[-d - 1] = ind if dim == -d - 1 else torch.arange(sd).reshape((sd,) + (1,) * d)
    return param[tuple(inds)].squeeze(dim)


def mixed_hmm_config(N_state=2, N_v=2, N_c=2, N_s=3, N_t=5, seed=0):
    """Animal-movement data of the mixed HMM's shape: step lengths (Gamma, zero-inflated),
    turning angles (VonMises), dive activity (Beta, zero-inflated), groups and individuals of
    several lengths, discrete random effects at both levels."""
    g = torch.Generator().manual_seed(seed)
    shape = (N_s, N_c, N_t)
    step = torch.distributions.Gamma(2.0, 1.0).sample(shape)
    step[torch.rand(shape, generator=g) < 0.2] = MISSING
    angle = (torch.rand(shape, generator=g) * 2 - 1) * 3.0
    omega = torch.rand(shape, generator=g) * 0.9 + 0.05
    omega[torch.rand(shape, generator=g) < 0.2] = MISSING
    lengths = torch.randint(2, N_t + 1, (N_s, N_c), generator=g)
    individual_mask = torch.ones(N_s, N_c, dtype=torch.bool)
    individual_mask[-1, -1] = False  # a group with fewer individuals
    return {
        "MISSING": MISSING,
        "sizes": {"state": N_state, "random": N_v, "group": N_c, "individual": N_s, "timesteps": N_t},
        "group": {"random": "discrete"},
        "individual": {"random": "discrete", "mask": individual_mask},
        "timestep": {"mask": torch.arange(N_t) < lengths.unsqueeze(-1)},
        "observations": {"step": step, "angle": angle, "omega": omega},
    }


@config_enumerate
def mixed_hmm(config):
    """Hierarchical mixed-effects HMM with discrete group and individual random effects."""
    MISSING = config["MISSING"]
    N_v, N_state = config["sizes"]["random"], config["sizes"]["state"]
    N_c = config["sizes"]["group"]
    g = torch.Generator().manual_seed(3)

    def init(*shape):
        return lambda: torch.randn(shape, generator=g).abs() + 0.5

    probs_e_g = pyro.param("probs_e_group", init(N_v), constraint=constraints.simplex)
    theta_g = pyro.param("theta_group", lambda: torch.randn((N_v, N_state**2), generator=g))
    probs_e_i = pyro.param("probs_e_individual", init(N_c, N_v), constraint=constraints.simplex)
    theta_i = pyro.param("theta_individual", lambda: torch.randn((N_c, N_v, N_state**2), generator=g))
    step_zi_param = pyro.param("step_zi_param", lambda: torch.ones((N_state, 2)))
    step_concentration = pyro.param("step_param_concentration", init(N_state), constraint=constraints.positive)
    step_rate = pyro.param("step_param_rate", init(N_state), constraint=constraints.positive)
    angle_concentration = pyro.param("angle_param_concentration", init(N_state), constraint=constraints.positive)
    angle_loc = pyro.param("angle_param_loc", init(N_state))
    omega_zi_param = pyro.param("omega_zi_param", lambda: torch.ones((N_state, 2)))
    omega_concentration0 = pyro.param("omega_param_concentration0", init(N_state), constraint=constraints.positive)
    omega_concentration1 = pyro.param("omega_param_concentration1", init(N_state), constraint=constraints.positive)

    gamma = torch.zeros((N_state**2,))
    with pyro.plate("group", N_c, dim=-1):
        e_g = pyro.sample("e_g", dist.Categorical(probs_e_g))
        gamma = gamma + _index_param(theta_g, e_g, dim=-2)
        N_s = config["sizes"]["individual"]
        with pyro.plate("individual", N_s, dim=-2), poutine.mask(mask=config["individual"]["mask"]):
            e_i = pyro.sample("e_i", dist.Categorical(probs_e_i))
            gamma = gamma + _index_param(theta_i, e_i, dim=-2)
            y = torch.tensor(0).long()
            for t in pyro.markov(range(config["sizes"]["timesteps"])):
                with poutine.mask(mask=config["timestep"]["mask"][..., t]):
                    gamma_t = gamma.reshape(tuple(gamma.shape[:-1]) + (N_state, N_state))
                    y = pyro.sample(f"y_{t}", dist.Categorical(logits=_index_param(gamma_t, y, dim=-2)))

                    step_dist = dist.Gamma(
                        concentration=_index_param(step_concentration, y, dim=-1),
                        rate=_index_param(step_rate, y, dim=-1),
                    )
                    step_zi_mask = pyro.sample(
                        f"step_zi_{t}",
                        dist.Categorical(logits=_index_param(step_zi_param, y, dim=-2)),
                        obs=(config["observations"]["step"][..., t] == MISSING),
                    )
                    step_zi_dist = dist.MaskedMixture(step_zi_mask, step_dist, dist.Delta(v=torch.tensor(MISSING)))
                    pyro.sample(f"step_{t}", step_zi_dist, obs=config["observations"]["step"][..., t])

                    angle_dist = dist.VonMises(
                        concentration=_index_param(angle_concentration, y, dim=-1),
                        loc=_index_param(angle_loc, y, dim=-1),
                    )
                    pyro.sample(f"angle_{t}", angle_dist, obs=config["observations"]["angle"][..., t])

                    omega_dist = dist.Beta(
                        concentration0=_index_param(omega_concentration0, y, dim=-1),
                        concentration1=_index_param(omega_concentration1, y, dim=-1),
                    )
                    omega_zi_mask = pyro.sample(
                        f"omega_zi_{t}",
                        dist.Categorical(logits=_index_param(omega_zi_param, y, dim=-2)),
                        obs=(config["observations"]["omega"][..., t] == MISSING),
                    )
                    omega_zi_dist = dist.MaskedMixture(omega_zi_mask, omega_dist, dist.Delta(v=torch.tensor(MISSING)))
                    pyro.sample(f"omega_{t}", omega_zi_dist, obs=config["observations"]["omega"][..., t])
