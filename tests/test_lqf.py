"""LQF: the linearized network (jvp), K-FAC factors and preconditioning, the
``lqf`` method (squared loss, hooks, composition with fd), export through the
registry, and one run on Ray Train."""

from __future__ import annotations

import inspect
import io
import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graceful_ray.errors import ConfigError, RegistryError
from graceful_ray.methods.lqf import KFACOptimizer, LinearizedModel, conv_factors, linear_factors, parameter_blocks
from graceful_ray.methods import METHODS, MethodBatch, UpgradeContext, UpgradeMethod, build_method
from graceful_ray.methods.lqf import LQF, load_pretrained, squared_loss
from graceful_ray.methods.registry import register_method
from graceful_ray.models import ModelSpec, build_model
from graceful_ray.registry import Registry, load_model

@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: intra-op threads only add synchronization (dramatically so on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CNN = ModelSpec("cnn1d", (40,), 5, {"channels": 4, "depth": 2, "embedding_dim": 6, "activation": "leaky_relu"})
MLP = ModelSpec("mlp", (6,), 3, {"width": 8, "depth": 2, "embedding_dim": 5, "activation": "leaky_relu"})
RESNET = ModelSpec("resnet", (1, 6, 6), 3, {"width": 2, "blocks": [1], "embedding_dim": 4,
                                            "activation": "leaky_relu"})


def _net(spec: ModelSpec, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = build_model(spec).to(dtype)
    if spec.factory == "resnet":  # non-trivial BatchNorm statistics
        net.train()
        with torch.no_grad():
            for _ in range(3):
                net(torch.randn(8, *spec.input_shape, dtype=dtype))
    return net.eval()


def _x(spec: ModelSpec, n: int = 7, seed: int = 1, dtype=torch.float32):
    return torch.randn(n, *spec.input_shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _set_delta(lin: LinearizedModel, direction: dict[str, torch.Tensor], scale: float = 1.0):
    with torch.no_grad():
        for n, p in lin.delta_parameters().items():
            p.copy_(scale * direction[n])


def _direction(lin: LinearizedModel, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g).to(p.dtype) for n, p in lin.delta_parameters().items()}


# ------------------------------------------------------------------------------------------
# The linearization
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [CNN, MLP, RESNET], ids=["cnn1d", "mlp", "resnet-bn"])
def test_linearization_equals_the_network_at_w0(spec):
    net = _net(spec)
    lin = LinearizedModel(net)
    x = _x(spec)
    emb0, logits0 = net.forward_features(x)
    lin.train()  # the function is the eval-mode network's whatever the mode
    emb, logits = lin.forward_features(x)
    assert torch.equal(emb, emb0) and torch.equal(logits, logits0)
    assert torch.equal(lin(x), logits0)
    assert all(not p.detach().any() for p in lin.delta_parameters().values())
    # w0 is a copy: training the network afterwards does not move the linearization point
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert torch.equal(lin.forward_features(x)[1], logits0)


@pytest.mark.parametrize("spec", [CNN, RESNET], ids=["cnn1d", "resnet-bn"])
def test_linearization_matches_a_finite_difference(spec):
    net = _net(spec, dtype=torch.float64)
    lin = LinearizedModel(net)
    x = _x(spec, dtype=torch.float64)
    d = _direction(lin)
    _set_delta(lin, d)
    emb_lin, logits_lin = lin.forward_features(x)
    emb0, logits0 = net.forward_features(x)
    jd_emb, jd_logits = emb_lin - emb0, logits_lin - logits0  # J d, both outputs

    eps = 1e-5
    w0 = dict(net.named_parameters())

    def f_at(scale):
        moved = build_model(spec).to(torch.float64)
        moved.load_state_dict(net.state_dict())
        with torch.no_grad():
            for n, p in moved.named_parameters():
                p.copy_(w0[n] + scale * d[n])
        return moved.eval().forward_features(x)

    (e_plus, l_plus), (e_minus, l_minus) = f_at(eps), f_at(-eps)
    fd_emb, fd_logits = (e_plus - e_minus) / (2 * eps), (l_plus - l_minus) / (2 * eps)
    assert torch.allclose(jd_emb, fd_emb, rtol=1e-5, atol=1e-7)
    assert torch.allclose(jd_logits, fd_logits, rtol=1e-5, atol=1e-7)
    # a small step of the network: f(w0 + t d) - f(w0) = t J d + O(t^2)
    def remainder(t):
        return float((f_at(t)[1] - logits0 - t * jd_logits).norm() / (t * jd_logits).norm())

    r1, r2 = remainder(1e-4), remainder(1e-5)  # (larger steps cross leaky-ReLU kinks)
    assert r2 < 1e-3 and r2 < r1 / 5


def test_the_linearized_model_is_linear_and_its_gradient_is_the_networks_at_w0():
    net = _net(CNN, dtype=torch.float64)
    lin = LinearizedModel(net)
    x = _x(CNN, dtype=torch.float64)
    f0 = net.forward_features(x)
    d1, d2 = _direction(lin, 1), _direction(lin, 2)
    _set_delta(lin, d1)
    j1 = [a - b for a, b in zip(lin.forward_features(x), f0)]
    _set_delta(lin, d2)
    j2 = [a - b for a, b in zip(lin.forward_features(x), f0)]
    _set_delta(lin, {n: 2.0 * d1[n] - 3.0 * d2[n] for n in d1})
    j12 = [a - b for a, b in zip(lin.forward_features(x), f0)]
    for a, b, c in zip(j12, j1, j2):
        assert torch.allclose(a, 2.0 * b - 3.0 * c, atol=1e-10)

    # d/d(delta) <c, f_lin> = J(w0)^T c, at any delta: the network's gradient at w0
    c = torch.randn(f0.logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (lin(x) * c).sum().backward()
    (net(x) * c).sum().backward()
    for n, p in lin.delta_parameters().items():
        assert torch.allclose(p.grad, dict(net.named_parameters())[n].grad, atol=1e-10)


def test_no_jacobian_is_materialized():
    # 1.1M parameters, 512 samples, 10 logits: a materialized Jacobian would be
    # 512 * 10 * 1.1M floats = 22 GB. Forward-mode (jvp) needs a few activations.
    spec = ModelSpec("mlp", (40,), 10, {"width": 1000, "depth": 2, "embedding_dim": 64,
                                        "activation": "leaky_relu"})
    lin = LinearizedModel(_net(spec))
    n_params = sum(p.numel() for p in lin.delta_parameters().values())
    assert n_params > 1_000_000
    _set_delta(lin, _direction(lin), scale=1e-3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    x = torch.randn(512, 40)
    emb, logits = lin.forward_features(x)
    logits.pow(2).sum().backward()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert logits.shape == (512, 10) and emb.shape == (512, 64)
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB"


def test_which_parameters_are_linearized_is_configurable():
    net = _net(CNN)
    assert [b for b, _ in parameter_blocks(net)] == ["backbone.convs.0", "backbone.convs.2", "backbone.proj", "head"]
    assert LinearizedModel(net).linearized == [n for n, _ in net.named_parameters()]
    last2 = LinearizedModel(net, layers="last:2")
    assert last2.linearized == ["backbone.proj.weight", "backbone.proj.bias", "head.weight", "head.bias"]
    pre = LinearizedModel(net, layers="backbone.convs.0, head")
    assert pre.linearized == ["backbone.convs.0.weight", "backbone.convs.0.bias", "head.weight", "head.bias"]
    assert LinearizedModel(net, layers=["head.weight"]).linearized == ["head.weight"]
    # frozen parameters stay at w0: only the linearized ones are trainable
    assert {n for n, p in last2.named_parameters()} == {"delta.backbone__proj__weight", "delta.backbone__proj__bias",
                                                        "delta.head__weight", "delta.head__bias"}
    x = _x(CNN)
    assert torch.equal(last2(x), net(x))
    last2(x).pow(2).sum().backward()
    assert all(p.grad is not None for p in last2.parameters())
    for bad, msg in [("last:9", "4 blocks"), ("last:x", "integer"), ("nothing", "matches no parameter"),
                     ("", "give 'all'")]:
        with pytest.raises(ConfigError, match=msg):
            LinearizedModel(net, layers=bad)


def test_to_network_plugs_w_into_the_architecture():
    net = _net(RESNET)
    lin = LinearizedModel(net, layers="last:3")
    _set_delta(lin, _direction(lin), scale=1e-2)
    plain = lin.to_network()
    assert type(plain) is type(net) and not plain.training
    w = dict(plain.named_parameters())
    for n, p in net.named_parameters():
        expect = p + lin.delta_parameters()[n] if n in lin.linearized else p
        assert torch.equal(w[n], expect)
    for n, b in net.named_buffers():
        assert torch.equal(dict(plain.named_buffers())[n], b)
    x = _x(RESNET)
    # the network at w and the linear model agree to first order, not exactly
    assert torch.allclose(plain(x), lin(x), atol=1e-2) and not torch.equal(plain(x), lin(x))
    assert torch.equal(lin.head.weight, w["head.weight"])


def test_head_calibration_keeps_every_decision_and_happens_once():
    net = _net(CNN)
    with torch.no_grad():
        net.head.weight.mul_(30.0)  # a cross-entropy head: logits far larger than one-hot targets
        net.head.bias.add_(4.0)
    lin = LinearizedModel(net)
    lin.pending_head_rms = 0.9
    x = _x(CNN, n=32)
    before = net(x)
    lin.train()
    with torch.no_grad():  # evaluation never calibrates
        assert torch.equal(lin(x), before)
    logits = lin(x)  # first training forward: calibrates on this batch
    assert bool(lin.head_calibrated)
    assert torch.equal(logits.argmax(1), before.argmax(1))
    centered = logits - logits.mean(1, keepdim=True)
    assert float(centered.pow(2).sum(1).mean().sqrt()) == pytest.approx(0.9, rel=1e-4)
    assert torch.allclose(logits.mean(1), torch.zeros(32), atol=1e-5)
    again = lin(x * 3)  # not re-calibrated
    assert torch.allclose(lin(x), logits)
    # the flag travels with the state dict: a resumed or rebuilt model does not calibrate again
    twin = LinearizedModel(_net(CNN))
    twin.pending_head_rms = 5.0
    twin.load_state_dict(lin.state_dict())
    assert torch.allclose(twin(x), logits) and again is not None
    # through the method: lqf_head_scale
    m = build_method("lqf", lqf_init="model", lqf_head_scale=0.5)
    m.setup(_ctx())
    scaled = m.wrap_model(_net(CNN))
    ref = _net(CNN)(x)
    assert torch.allclose(scaled(x), 0.5 * (ref - ref.mean(1, keepdim=True)), atol=1e-5)
    keep = build_method("lqf", lqf_init="model", lqf_head_scale="none")
    keep.setup(_ctx())
    assert torch.equal(keep.wrap_model(_net(CNN))(x), ref)


# ------------------------------------------------------------------------------------------
# K-FAC
# ------------------------------------------------------------------------------------------

def test_linear_factors_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    a, grad_out = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    A, G = linear_factors(a, grad_out, bias=True)
    a1 = torch.cat([a, torch.ones(6, 1)], 1)
    assert torch.allclose(A, sum(torch.outer(r, r) for r in a1) / 6, atol=1e-6)
    assert torch.allclose(G, sum(torch.outer(r, r) for r in grad_out) / 6, atol=1e-6)
    # one sample: A (x) G is exactly the outer product of the (weight, bias) gradient
    A1, G1 = linear_factors(a[:1], grad_out[:1], bias=True)
    grad = torch.outer(grad_out[0], a1[0])  # d loss / d [W b] for s = W a + b
    vec = grad.T.reshape(-1)  # column-major vec
    assert torch.allclose(torch.kron(A1, G1), torch.outer(vec, vec), atol=1e-5)


def test_conv_factors_match_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=1)
    x = torch.randn(4, 2, 9, generator=g)
    out = conv(x)
    grad_out = torch.randn(out.shape, generator=g)
    A, G = conv_factors(conv, x, grad_out, bias=True)
    xp = F.pad(x, (1, 1))
    A_ref, G_ref = torch.zeros(7, 7), torch.zeros(3, 3)
    T = out.shape[2]
    for b in range(4):
        for t in range(T):
            patch = torch.cat([xp[b, :, 2 * t:2 * t + 3].reshape(-1), torch.ones(1)])  # (C_in, k) order
            A_ref += torch.outer(patch, patch)
            G_ref += torch.outer(grad_out[b, :, t], grad_out[b, :, t])
    assert torch.allclose(A, A_ref / 4, atol=1e-5)  # summed over positions, mean over samples
    assert torch.allclose(G, G_ref / (4 * T), atol=1e-5)  # mean over samples and positions
    # the patch layout matches the weight's: A's diagonal block pairs with weight.view(out, -1)
    w_grad = torch.autograd.grad((conv(x) * grad_out).sum(), conv.weight)[0]
    direct = sum(torch.outer(grad_out[b, :, t], torch.cat([xp[b, :, 2 * t:2 * t + 3].reshape(-1)]))
                 for b in range(4) for t in range(T))
    assert torch.allclose(w_grad.reshape(3, -1), direct, atol=1e-5)


def test_kfac_factors_of_the_network_at_w0():
    net = _net(MLP)
    lin = LinearizedModel(net)
    opt = KFACOptimizer(lin, lr=0.1)
    x = _x(MLP, n=16)
    v = torch.randn(16, 3, generator=torch.Generator().manual_seed(5))
    _set_delta(lin, _direction(lin))  # factors do not depend on delta: they are the network's at w0
    factors = opt.batch_factors(x, v)
    assert list(factors) == ["backbone.1", "backbone.3", "backbone.5", "head"]
    ones = torch.ones(16, 1)
    # first layer: inputs are the data; head: inputs are the embeddings at w0, g = v
    A, _ = factors["backbone.1"]
    assert torch.allclose(A, torch.cat([x, ones], 1).T @ torch.cat([x, ones], 1) / 16, atol=1e-5)
    emb0 = net.embed(x).detach()
    A, G = factors["head"]
    assert torch.allclose(A, torch.cat([emb0, ones], 1).T @ torch.cat([emb0, ones], 1) / 16, atol=1e-5)
    assert torch.allclose(G, v.T @ v / 16, atol=1e-5)
    # a hidden layer: g = J^T v through the network at w0
    outs = {}
    net.backbone[3].register_forward_hook(lambda m, i, o: outs.update(s=o))
    logits = net(x)
    g = torch.autograd.grad((logits * v).sum(), outs["s"])[0]
    assert torch.allclose(factors["backbone.3"][1], g.T @ g / 16, atol=1e-5)


def test_preconditioning_is_the_damped_kronecker_inverse():
    lin = LinearizedModel(_net(MLP))
    opt = KFACOptimizer(lin, lr=0.1, damping=1e-2)
    opt.update_factors(_x(MLP, n=16))
    layer = opt.layers[-1]  # the head
    st = opt.state[layer.weight]
    gw, gb = torch.randn(layer.weight.shape), torch.randn(layer.bias.shape)
    uw, ub = opt.precondition(layer, gw, gb)
    m = torch.cat([gw, gb[:, None]], 1)
    A_d, G_d = torch.linalg.inv(st["A_inv"].double()), torch.linalg.inv(st["G_inv"].double())
    # (A_d (x) G_d) vec(U) = vec(M), column-major vec
    u = torch.cat([uw, ub[:, None]], 1)
    lhs = torch.kron(A_d, G_d) @ u.T.reshape(-1).double()
    assert torch.allclose(lhs, m.T.reshape(-1).double(), atol=1e-4)
    # A_d - A and G_d - G are multiples of I whose product is the damping: relative to the
    # mean eigenvalues of A and G by default, absolute (pi-split, Martens & Grosse) on request
    A, G = st["A"].double(), st["G"].double()
    ga, gg = (A_d - A)[0, 0], (G_d - G)[0, 0]
    mean_a, mean_g = float(torch.trace(A)) / A.shape[0], float(torch.trace(G)) / G.shape[0]
    assert float(ga * gg) == pytest.approx(1e-2 * mean_a * mean_g, rel=1e-3)
    assert float(ga / gg) == pytest.approx(mean_a / mean_g, rel=1e-3)
    absolute = KFACOptimizer(lin, lr=0.1, damping=1e-2, relative_damping=False)
    ga, gg = absolute.damping_terms(st["A"], st["G"])
    assert ga * gg == pytest.approx(1e-2) and ga / gg == pytest.approx(mean_a / mean_g, rel=1e-3)


def _toy_problem(seed: int = 0):
    torch.manual_seed(seed)
    spec = ModelSpec("mlp", (6,), 3, {"width": 16, "depth": 1, "embedding_dim": 8, "activation": "leaky_relu"})
    net = build_model(spec).eval()
    x = torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))
    return net, x, y


@pytest.mark.parametrize("kfac,lr", [(False, 0.05), (True, 0.1)], ids=["sgd", "kfac"])
def test_training_the_convex_problem_reduces_the_loss_monotonically(kfac, lr):
    net, x, y = _toy_problem()
    method = build_method("lqf", lqf_kfac=kfac, lqf_init="model", lqf_momentum=0.0, lqf_update_every=5)
    method.setup(UpgradeContext(num_classes=3, new_embedding_dim=8))
    model = method.wrap_model(net)
    opt = method.make_optimizer(model, lr=lr, weight_decay=0.0)
    assert isinstance(opt, KFACOptimizer) == kfac
    losses = []
    for _ in range(25):
        emb, logits = model.forward_features(x)
        out = method.loss(MethodBatch(y=y, new_embedding=emb, new_logits=logits))
        losses.append(float(out.total))
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.7 * losses[0]


def test_kfac_beats_the_best_sgd_step_on_an_ill_conditioned_problem():
    def final_loss(kfac: bool, lr: float) -> float:
        net, x, y = _toy_problem()
        with torch.no_grad():
            net.backbone[1].weight[:, 0] *= 20.0  # one input direction dominates the curvature
        method = build_method("lqf", lqf_kfac=kfac, lqf_init="model", lqf_momentum=0.0, lqf_update_every=5)
        method.setup(UpgradeContext(num_classes=3, new_embedding_dim=8))
        model = method.wrap_model(net)
        opt = method.make_optimizer(model, lr=lr, weight_decay=0.0)
        for _ in range(20):
            loss = method.loss(MethodBatch(y, *model.forward_features(x))).total
            opt.zero_grad()
            loss.backward()
            opt.step()
        out = float(method.loss(MethodBatch(y, *model.forward_features(x))).total)
        return out if out == out else float("inf")

    best_sgd = min(final_loss(False, lr) for lr in (3e-2, 1e-2, 3e-3, 1e-3))
    assert final_loss(True, 0.1) < best_sgd


def test_kfac_state_round_trips_for_resume():
    lin = LinearizedModel(_net(MLP))
    opt = KFACOptimizer(lin, lr=0.1, update_every=2)
    x, y = _x(MLP, n=16), torch.arange(16) % 3

    def step(model, o):
        o.zero_grad()
        squared_loss(model(x), y).backward()
        o.step()

    for _ in range(3):
        step(lin, opt)
    buf = io.BytesIO()  # as the trainer's checkpoint does (torch.save, weights_only load)
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin = LinearizedModel(_net(MLP))
    twin.load_state_dict(lin.state_dict())
    opt2 = KFACOptimizer(twin, lr=0.1, update_every=2)
    opt2.load_state_dict(saved)
    assert opt2.state["kfac"] == {"steps": 3, "collected": 3}
    for a, b in zip(opt.layers, opt2.layers):
        for key in ("A", "G", "A_inv", "G_inv", "momentum_buffer"):
            assert torch.equal(opt.state[a.weight][key], opt2.state[b.weight][key])
        assert opt.state[a.weight]["scale"] == opt2.state[b.weight]["scale"]
    step(lin, opt)  # the same next step
    step(twin, opt2)
    for p, q in zip(lin.parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------

def _ctx(k=5, old_classes=(0, 1, 2, 3, 4)):
    g = torch.Generator().manual_seed(0)
    return UpgradeContext(num_classes=k, old_classes=list(old_classes),
                          old_head_weight=torch.randn(len(old_classes), 6, generator=g),
                          old_head_bias=torch.zeros(len(old_classes)), old_embedding_dim=6, new_embedding_dim=6)


def test_squared_loss_replaces_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    y = torch.tensor([0, 2])
    expect = 0.5 * (((2 - 3) ** 2 + 0 + 1) + (0.25 + 0.25 + (0.5 - 3) ** 2)) / 2
    assert float(squared_loss(logits, y, 3.0)) == pytest.approx(expect)
    m = build_method("lqf", lqf_init="model", lqf_target_scale=3.0)
    m.setup(_ctx(k=3, old_classes=(0, 1, 2)))
    out = m.loss(MethodBatch(y, torch.zeros(2, 6), logits))
    assert set(out.parts) == {"lqf"} and float(out.total) == pytest.approx(expect)
    hp = m.hyperparameters()
    assert hp == {"lqf_kfac": True, "lqf_damping": 1e-2, "lqf_update_every": 10, "lqf_target_scale": 3.0,
                  "lqf_layers": "all", "lqf_momentum": 0.9, "lqf_init": "model", "lqf_registry": "",
                  "lqf_export_format": "linearized", "lqf_head_scale": "auto"}
    assert build_method("lqf", **hp).hyperparameters() == hp


def test_lqf_composes_with_focal_distillation():
    ctx = _ctx()
    method = build_method("lqf+fd", lqf_init="model", fd_beta=5.0)
    method.setup(ctx)
    net = _net(CNN)
    model = method.wrap_model(net)  # the composite exposes lqf's hooks
    assert isinstance(model, LinearizedModel)
    assert isinstance(method.make_optimizer(model, lr=0.1, weight_decay=0.0), KFACOptimizer)
    x = _x(CNN, n=8)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    with torch.no_grad():
        old_emb, old_logits = net.forward_features(x)
    emb, logits = model.forward_features(x)
    batch = MethodBatch(y, emb, logits, old_emb, old_logits + 0.5, torch.ones(8, dtype=torch.bool))
    out = method.loss(batch)
    assert set(out.parts) == {"lqf", "fd"}  # squared loss + FD, no cross-entropy
    assert float(out.parts["fd"]) > 0
    assert float(out.total) == pytest.approx(float(out.parts["lqf"] + out.parts["fd"]))
    assert float(out.parts["lqf"]) == pytest.approx(float(squared_loss(logits, y)))
    out.total.backward()
    assert all(p.grad is not None for p in model.parameters())
    # the hooks are declared methods: the composite delegates, it copies nothing onto itself
    assert not {"wrap_model", "make_optimizer", "export"} & set(vars(method))
    assert method.overrides("wrap_model") and method.overrides("export")
    # methods without hooks get the trainer's defaults
    plain_hooks = build_method("bct+fd")
    assert plain_hooks.wrap_model(net) is net and not plain_hooks.overrides("wrap_model")
    assert plain_hooks.make_optimizer(net, lr=0.1) is None  # the trainer's AdamW
    assert set(build_method("plain").loss(MethodBatch(y, emb.detach(), logits.detach())).parts) == {"ce"}


def test_lqf_takes_the_parent_through_the_trainers_loader():
    """lqf_init='parent' linearizes around the weights UpgradeContext.load_model gives
    for the old model's reference: the method opens no registry itself."""
    parent = _net(CNN)
    asked = []

    def load_model(ref, root=None):
        asked.append((ref, root))
        return None, parent

    ctx = _ctx()
    ctx.old_ref, ctx.load_model = "toy@v1", load_model
    method = build_method("lqf", lqf_head_scale="none")
    method.setup(ctx)
    lin = method.wrap_model(_net(CNN))
    assert asked == [("toy@v1", None)]
    for name, w in parent.state_dict().items():
        assert torch.equal(lin.w0_parameters()[name], w)
    with pytest.raises(ConfigError, match="model loader"):
        ctx.load_model = None
        build_method("lqf").setup(ctx)


def test_two_members_may_not_both_own_a_trainer_hook():
    from graceful_ray.methods import Composite, UpgradeMethod

    class Wrapping(UpgradeMethod):
        name, prefix = "wrapping", "wrapping"

        def wrap_model(self, model):
            return model

        def extra_loss(self, batch):
            return {}

    with pytest.raises(ConfigError, match="both define 'wrap_model'"):
        Composite([build_method("lqf", lqf_init="model").methods[0], Wrapping()])


def test_only_one_method_may_replace_the_base_loss():
    @register_method("test-hinge")
    class Hinge(UpgradeMethod):
        name, prefix, replaces_base_loss = "test-hinge", "hinge", True

        def __init__(self) -> None:
            super().__init__()

        def extra_loss(self, batch):
            return {}

        def base_loss(self, batch):
            return {"hinge": F.multi_margin_loss(batch.new_logits, batch.y)}

    try:
        with pytest.raises(ConfigError, match="replace the base loss"):
            build_method("lqf+test-hinge", lqf_init="model")
    finally:
        METHODS.pop("test-hinge", None)


def test_lqf_needs_pretrained_weights_and_says_where_from():
    first = UpgradeContext(num_classes=3, new_embedding_dim=4)
    with pytest.raises(ConfigError, match="fine-tunes a pretrained network"):
        build_method("lqf").setup(first)
    with pytest.raises(ConfigError, match="lqf_init"):
        build_method("lqf").setup(_ctx())  # a parent, but no reference to load it from
    for bad, msg in [({"lqf_damping": 0}, "lqf_damping must be > 0"),
                     ({"lqf_update_every": 0}, "update_every"),
                     ({"lqf_export_format": "onnx"}, "export_format"),
                     ({"lqf_kfac": "maybe"}, "true or false"),
                     ({"lqf_momentum": 1.0}, "momentum")]:
        with pytest.raises(ConfigError, match=msg):
            build_method("lqf", **bad)
    assert build_method("lqf", lqf_kfac="false").methods[0].kfac is False


def test_load_pretrained_maps_the_head_by_class():
    src = _net(CNN, seed=1)
    new = build_model(ModelSpec("cnn1d", (40,), 4, CNN.kwargs))
    fresh_row = new.head.weight[3].detach().clone()
    # old output j -> new head position (-1 and 5: not in the new head)
    ctx = UpgradeContext(num_classes=4, old_classes=[2, -1, 0, 1, 5], new_embedding_dim=6)
    load_pretrained(new, src.state_dict(), ctx)
    for j, pos in enumerate(ctx.old_classes):
        if 0 <= pos < 4:
            assert torch.equal(new.head.weight[pos], src.head.weight[j])
    assert torch.equal(new.head.weight[3], fresh_row)  # a class the old model lacks keeps its init
    assert torch.equal(new.backbone.proj.weight, src.backbone.proj.weight)
    with pytest.raises(ConfigError, match="do not fit"):
        load_pretrained(build_model(ModelSpec("cnn1d", (40,), 4, {**CNN.kwargs, "channels": 5})),
                        src.state_dict(), ctx)


# ------------------------------------------------------------------------------------------
# Export and the registry
# ------------------------------------------------------------------------------------------

def _trained_linearized(layers="all"):
    net = _net(CNN)
    lin = LinearizedModel(net, layers=layers)
    _set_delta(lin, _direction(lin), scale=0.05)
    return net, lin


def test_export_round_trip_through_the_registry(tmp_path):
    net, lin = _trained_linearized(layers="last:3")
    reg = Registry(str(tmp_path))
    x = _x(CNN, n=9)
    want = lin.forward_features(x)

    state, fmt = build_method("lqf", lqf_init="model").export(lin)
    assert fmt == "linearized"
    m = reg.publish("lq", state, spec=CNN, classes=range(5), method="lqf", format=fmt)
    manifest, loaded = load_model(reg, m.ref)
    assert manifest.format == "linearized" and isinstance(loaded, LinearizedModel) and not loaded.training
    assert loaded.linearized == lin.linearized
    got = loaded.forward_features(x)
    assert torch.allclose(got[0], want[0], atol=1e-6) and torch.allclose(got[1], want[1], atol=1e-6)
    assert loaded.embedding_dim == 6 and loaded.num_classes == 5
    # the evaluation path sees the linearized function, not the network at w
    from graceful_ray.evaluate import predict

    p = predict(str(tmp_path), m.ref, x.numpy())
    assert torch.allclose(torch.from_numpy(p.logits), want[1], atol=1e-5)
    assert not torch.allclose(lin.to_network()(x), want[1], atol=1e-5)

    state, fmt = build_method("lqf", lqf_init="model", lqf_export_format="network").export(lin)
    m2 = reg.publish("lq", state, spec=CNN, classes=range(5), method="lqf", format=fmt)
    manifest2, plain = load_model(reg, m2.ref)
    assert manifest2.format == "network" and type(plain) is type(net)
    assert torch.allclose(plain(x), lin.to_network()(x), atol=1e-6)

    bogus = reg.publish("junk", {"w": torch.zeros(2)}, spec=CNN, classes=range(5), format="linearized")
    with pytest.raises(RegistryError, match="linearized"):
        load_model(reg, bogus.ref)


def test_trainer_export_rebuilds_the_linearized_model_from_a_checkpoint():
    from graceful_ray.train.config import UpgradeConfig
    from graceful_ray.train.trainer import export_for_registry

    _, lin = _trained_linearized()
    checkpoint = {k: v.clone() for k, v in lin.state_dict().items()}
    cfg = UpgradeConfig(data="unused", model="cnn1d", model_kwargs=CNN.kwargs, method="lqf",
                        hparams={"lqf_init": "model"})
    # (cfg, spec, state) or, in the trainer's newer form, (cfg, loop_config, state)
    second = list(inspect.signature(export_for_registry).parameters)[1]
    arg = CNN if second == "spec" else {"spec": CNN.to_dict(), "context": {}, "classes": list(range(5))}
    state, fmt = export_for_registry(cfg, arg, checkpoint)
    assert fmt == "linearized" and set(state) == set(checkpoint)
    assert all(torch.equal(state[k], checkpoint[k]) for k in state)


# ------------------------------------------------------------------------------------------
# On Ray Train
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lqf_runs_on_ray_train_and_publishes_the_linearized_model(ray_module, mnist1d_small, tmp_path):
    from graceful_ray.train.config import UpgradeConfig
    from graceful_ray.train.trainer import run_upgrade

    registry, storage = str(tmp_path / "registry"), str(tmp_path / "runs")
    base = dict(data=mnist1d_small, registry=registry, storage=storage, model="cnn1d",
                model_kwargs={"channels": 8, "activation": "leaky_relu"}, batch_size=128, cpus_per_worker=1.0)
    # the parent: Ray Train's local mode (workers=0); the lqf+fd run below is the one on a worker group
    v1 = run_upgrade(UpgradeConfig(**base, train_split="old_train", epochs=3, workers=0, run_name="lqf-v1"))
    # w0 = the parent's weights. (lqf_init defaults to "parent", which needs a trainer that
    # fills UpgradeContext.old_ref/registry; naming it explicitly works with any.)
    # lqf+fd: keep the parent's head scale (fd matches the parent's raw logits).
    hp = {"lqf_init": v1.model_ref, "lqf_registry": registry, "lqf_update_every": 5,
          "lqf_head_scale": "none", "lqf_target_scale": 5.0}
    run = run_upgrade(UpgradeConfig(**base, method="lqf+fd", hparams=hp, old=v1.model_ref, epochs=2,
                                    lr=0.05, run_name="lqf-v2"))
    reg = Registry(registry)
    m = reg.get(run.model_ref)
    assert m.format == "linearized" and m.method == "lqf+fd" and m.parent == v1.model_ref
    assert m.hyperparameters["lqf_kfac"] is True and m.hyperparameters["lr"] == 0.05
    assert {"loss_lqf", "loss_fd", "val_nfr"} <= set(run.metrics) and "loss_ce" not in run.metrics
    assert run.history[-1]["loss"] < run.history[0]["loss"]
    # w0 is the parent's weights: the linearization starts at v1's function
    _, parent = load_model(reg, v1.model_ref)
    _, child = load_model(reg, run.model_ref)
    assert isinstance(child, LinearizedModel)
    for n, w in parent.state_dict().items():
        assert torch.equal(child.w0_parameters()[n], w)
    # evaluation uses the linearized function: its accuracy is the run's last validation accuracy
    from graceful_ray.data import load_split
    from graceful_ray.evaluate import predict

    x, y, _ = load_split(mnist1d_small, "val")
    acc = float((predict(registry, run.model_ref, x).pred == y).mean())
    assert acc == pytest.approx(run.metrics["val_accuracy"], abs=1e-6)
    assert acc > 0.3
