"""Adversarial attacks and robustness metrics for the local leaderboard.

Every attack takes any ``nn.Module`` mapping a float32 batch in [0, 1] of shape (N, 3, H, W)
to logits, and returns adversarial images of the same shape that lie inside the eps-ball of
the input (in the attack's norm) and inside [0, 1]. Attacks run the model in eval mode (the
previous train/eval flags are restored afterwards), compute in float32 and take gradients
with ``torch.autograd.grad`` w.r.t. the input only, so no parameter ``.grad`` is touched.

Gradient attacks (FGSM, PGD, C&W) can be fooled by gradient masking such as GCM; the Square
attack uses forward passes only and a transfer attack uses another model's gradients, so
both see through it. Randomized defenses need EOT (``pgd(..., eot_samples=n)``) for the
gradients and ``expected_accuracy`` / ``run_attack(..., draws=n)`` for the evaluation.

Configs name attacks through ``ATTACKS``; ``run_attack`` runs one by name in batches.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from train.errors import UserError

__all__ = [
    "fgsm", "pgd", "cw_l2", "square_linf", "random_noise", "transfer",
    "EOT", "expected_accuracy", "robust_metrics", "worst_case",
    "project", "project_l1_ball", "lp_norm", "eval_mode", "ATTACKS", "resolve_attack", "run_attack",
]

NORMS = ("linf", "l2", "l1")


# --- helpers -------------------------------------------------------------------------------

@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for a block, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


def _rand(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) noise drawn on the generator's device (a CPU generator also serves CUDA inputs)."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def _rand_sign(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    return torch.where(_rand(shape, generator, like) < 0.5, -1.0, 1.0)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (N,) to broadcast against a batch (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of a batch of perturbations, shape (N,), in delta's dtype.

    L1/L2 sums are accumulated in float64: over ~150k coordinates a float32 sum drifts by
    ~1e-6 relative, enough to make a projected perturbation look outside its ball.
    """
    flat = delta.flatten(1)
    if _check_norm(norm) == "linf":
        return flat.abs().amax(1)
    return flat.double().norm(p=2 if norm == "l2" else 1, dim=1).to(delta.dtype)


def _unit_sphere(like: torch.Tensor, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """Random directions of unit norm: random signs (linf), normalized Gaussian (l2) or
    normalized Laplace (l1) noise; the last two are uniform on their spheres."""
    if norm == "linf":
        return _rand_sign(like.shape, generator, like)
    u = _rand(like.shape, generator, like)
    if norm == "l2":  # Box-Muller: Gaussian noise from the same generator
        v = _rand(like.shape, generator, like)
        d = torch.sqrt(-2 * torch.log1p(-u)) * torch.cos(2 * math.pi * v)
    else:  # Laplace: exponential magnitude, random sign
        d = -torch.log1p(-u) * _rand_sign(like.shape, generator, like)
    return d / _view(lp_norm(d, norm).clamp_min(1e-12), d)


def project_l1_ball(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each sample onto the L1 ball of radius eps (Duchi et al. 2008).

    Soft-thresholds |delta| by the theta that makes the L1 norm exactly eps; samples already
    inside the ball are returned unchanged. Computed in float64 so the cumulative sums over
    ~150k coordinates do not drift past the radius.
    """
    flat = delta.flatten(1).double()
    mag = flat.abs()
    inside = mag.sum(1) <= eps
    srt = mag.sort(dim=1, descending=True).values
    cssv = srt.cumsum(1)
    j = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    # rho = the largest j with srt_j > (cssv_j - eps) / j; the condition holds on a prefix.
    rho = ((srt * j > cssv - eps) * j).amax(1).clamp_min(1)
    theta = (cssv.gather(1, rho.long().unsqueeze(1) - 1).squeeze(1) - eps) / rho
    out = flat.sign() * (mag - theta.unsqueeze(1)).clamp_min(0)
    out = torch.where(inside.unsqueeze(1), flat, out)
    return out.to(delta.dtype).view_as(delta)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project a batch of perturbations onto the eps-ball of ``norm`` (per sample)."""
    if _check_norm(norm) == "linf":
        return delta.clamp(-eps, eps)
    if norm == "l2":
        scale = (eps / lp_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)
        return delta * _view(scale, delta)
    return project_l1_ball(delta, eps)


def _apply(x: torch.Tensor, delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """x + delta projected onto the ball, then clipped to the box. Clipping only moves each
    coordinate of delta towards 0 (x is in the box), so every norm can only shrink: the
    result stays in the ball."""
    return (x + project(delta, eps, norm)).clamp(0.0, 1.0)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logit of the true class minus the best other logit; < 0 means misclassified."""
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, y.unsqueeze(1), float("-inf")).amax(1)
    return true - other


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int = 1) -> torch.Tensor:
    """Gradient of the summed cross-entropy w.r.t. x, averaged over ``samples`` passes (EOT)."""
    grad = torch.zeros_like(x)
    for _ in range(samples):
        x_ = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_).float(), y, reduction="sum")
            grad += torch.autograd.grad(loss, x_)[0]
    # A masked gradient may be huge; never let inf/nan turn into a NaN image.
    return torch.nan_to_num(grad / samples, nan=0.0, posinf=1e30, neginf=-1e30)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


# --- attacks -------------------------------------------------------------------------------

def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, eot_samples: int = 1) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015), Linf: ``x + eps * sign(grad)``."""
    return pgd(model, x, y, eps, norm="linf", steps=1, step_size=eps, random_start=False,
               eot_samples=eot_samples)


def _l1_step(grad: torch.Tensor, x_adv: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Sparse L1 descent direction (Tramer & Boneh 2019): the signs of the top (1 - sparsity)
    fraction of gradient coordinates, scaled to unit L1 norm. Coordinates stuck at a box
    bound and pushed outwards are skipped, since clipping would waste the step on them."""
    g = grad.flatten(1)
    xa = x_adv.flatten(1)
    g = g.masked_fill(((xa <= 0) & (g < 0)) | ((xa >= 1) & (g > 0)), 0.0)
    k = max(1, int(round((1.0 - sparsity) * g.shape[1])))
    mag = g.abs()
    thresh = mag.topk(k, dim=1).values[:, -1:]
    step = g.sign() * ((mag >= thresh) & (mag > 0))
    step = step / step.abs().sum(1, keepdim=True).clamp_min(1.0)
    return step.view_as(grad)


def _pgd_once(model, x, y, eps, norm, steps, step_size, random_start, generator, eot_samples, l1_sparsity):
    if random_start:
        if norm == "linf":
            delta = (2 * _rand(x.shape, generator, x) - 1) * eps
        else:  # a random direction at a random radius inside the ball
            radius = _rand((x.shape[0],), generator, x) * eps
            delta = _unit_sphere(x, norm, generator) * _view(radius, x)
        x_adv = _apply(x, delta, eps, norm)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        grad = _input_grad(model, x_adv, y, eot_samples)
        if norm == "linf":
            step = grad.sign()
        elif norm == "l2":
            step = grad / _view(lp_norm(grad, "l2").clamp_min(1e-12), grad)
        else:
            step = _l1_step(grad, x_adv, l1_sparsity)
        x_adv = _apply(x, x_adv + step_size * step - x, eps, norm)
    return x_adv


def pgd(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        norm: str = "linf",
        steps: int = 20,
        step_size: float | None = None,
        restarts: int = 1,
        random_start: bool = True,
        generator: torch.Generator | None = None,
        eot_samples: int = 1,
        l1_sparsity: float = 0.99,
) -> torch.Tensor:
    """Projected gradient descent maximizing the cross-entropy (Madry et al. 2018).

    Linf steps along the gradient sign; L2 along the L2-normalized gradient; L1 along the
    sparse L1 descent direction (top ``1 - l1_sparsity`` coordinates), followed by the exact
    L1-ball projection and the [0, 1] clip.

    Args:
        model: Maps a float32 batch in [0, 1] to logits.
        x: Clean images (N, C, H, W) in [0, 1].
        y: True labels (N,).
        eps: Radius of the ball, in [0, 1] pixel units, in ``norm``.
        norm: "linf", "l2" or "l1".
        steps: Gradient steps per restart.
        step_size: Step length in ``norm``; default 3/40 * eps (the paper's setting: 20
            steps travel 1.5 * eps in total).
        restarts: Random restarts. Only samples not yet fooled are attacked again, so a
            sample keeps its first successful adversarial, otherwise the last restart's.
        random_start: Start from a random point of the ball (else from x).
        generator: Source of the random starts (reproducible runs).
        eot_samples: Forward/backward passes averaged per step (Expectation over
            Transformation, for randomized defenses).
        l1_sparsity: Fraction of coordinates left out of each L1 step (0.99: top 1%).

    Returns:
        Adversarial images, same shape as x, float32.
    """
    _check_norm(norm)
    x = x.detach().float()
    step_size = 3 / 40 * eps if step_size is None else step_size
    x_best = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with eval_mode(model):
        for r in range(max(1, restarts)):
            idx = (~fooled).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            adv = _pgd_once(model, x[idx], y[idx], eps, norm, steps, step_size, random_start,
                            generator, eot_samples, l1_sparsity)
            x_best[idx] = adv
            if r < restarts - 1:  # the last restart needs no success check
                fooled[idx] = _predict(model, adv) != y[idx]
    return x_best


def cw_l2(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        c: float = 1.0,
        kappa: float = 0.0,
        steps: int = 100,
        lr: float = 0.01,
        max_norm: float | None = None,
) -> torch.Tensor:
    """Carlini-Wagner L2 attack (2017), untargeted, fixed c, optimized with Adam in tanh space.

    Minimizes ``||x' - x||_2^2 + c * max(z_y - max_{i!=y} z_i, -kappa)`` over
    ``x' = (tanh(w) + 1) / 2``, which keeps x' in [0, 1] without clipping.

    Args:
        c: Weight of the misclassification term (no binary search).
        kappa: Required confidence margin of a success.
        steps: Adam steps.
        lr: Adam learning rate.
        max_norm: If set, the final perturbation is projected onto this L2 ball (the paper
            reports C&W at a fixed L2 budget); the projected image may no longer fool.

    Returns:
        Per sample, the smallest-L2 successful iterate, else the original image.
    """
    x = x.detach().float()
    w = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6)).requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    best = x.clone()
    best_l2 = torch.full((x.shape[0],), float("inf"), device=x.device)
    with eval_mode(model):
        for _ in range(steps):
            with torch.enable_grad():
                x_adv = (torch.tanh(w) + 1) / 2
                l2 = (x_adv - x).flatten(1).pow(2).sum(1)
                margin = _margin(model(x_adv).float(), y)
                loss = (l2 + c * margin.clamp_min(-kappa)).sum()
                w.grad = torch.autograd.grad(loss, w)[0]
            with torch.no_grad():  # bookkeeping on the iterate just evaluated
                better = (margin < -kappa) & (l2 < best_l2)
                best[better] = x_adv[better]
                best_l2[better] = l2[better]
            optimizer.step()
    best = best.detach()
    if max_norm is not None:
        best = _apply(x, best - x, max_norm, "l2")
    return best


def _square_p(p_init: float, it: int, n_iters: int) -> float:
    """Schedule of the fraction of pixels changed per query (reference implementation)."""
    it = int(it / n_iters * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                       (4000, 64), (6000, 128), (8000, 256), (10000, 512)):
        if it <= bound:
            return p_init / div
    return p_init


@torch.no_grad()
def square_linf(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        queries: int = 1000,
        p_init: float = 0.05,
        generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Square Attack, Linf (Andriushchenko et al. 2020): score-based black box.

    Starts from vertical stripes of +-eps, then proposes random squares of +-eps (one sign
    per channel) of shrinking size and keeps a proposal when it lowers the margin loss
    (true logit minus best other logit). Forward passes only, so gradient masking cannot
    affect it. A sample stops as soon as it is misclassified; samples misclassified on the
    clean image are returned unchanged.

    Args:
        queries: Forward passes per sample after the clean one (including the stripes).
        p_init: Initial fraction of pixels in a square.

    Returns:
        Adversarial images, same shape as x.
    """
    x = x.detach().float()
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    with eval_mode(model):
        x_best = x.clone()
        margin = _margin(model(x).float(), y)
        idx = (margin > 0).nonzero().squeeze(1)
        if idx.numel():
            stripes = (x[idx] + eps * _rand_sign((idx.numel(), c, 1, w), generator, x)).clamp(0, 1)
            x_best[idx] = stripes
            margin[idx] = _margin(model(stripes).float(), y[idx])
        for it in range(queries - 1):
            idx = (margin > 0).nonzero().squeeze(1)
            k = idx.numel()
            if k == 0:
                break
            xc, xb = x[idx], x_best[idx]
            s = int(round(math.sqrt(_square_p(p_init, it, queries) * h * w)))
            s = min(max(s, 1), min(h, w) - 1) if min(h, w) > 1 else 1
            top = (_rand((k,), generator, x) * (h - s + 1)).long()
            left = (_rand((k,), generator, x) * (w - s + 1)).long()
            in_rows = (rows >= top[:, None]) & (rows < top[:, None] + s)
            in_cols = (cols >= left[:, None]) & (cols < left[:, None] + s)
            window = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (k, 1, h, w)
            delta = xb - xc
            redraw = torch.ones(k, dtype=torch.bool, device=x.device)
            # Redraw the square's signs while the proposal equals the current image (e.g. the
            # same signs again, or a clipped corner), as the reference code does.
            for _ in range(10):
                signs = _rand_sign((k, c, 1, 1), generator, x)
                delta = torch.where(window & _view(redraw, delta), eps * signs, delta)
                x_new = (xc + delta).clamp(0, 1)
                changed = (((x_new - xb).abs() > 1e-7) & window).flatten(1).any(1)
                redraw &= ~changed
                if not redraw.any():
                    break
            new_margin = _margin(model(x_new).float(), y[idx])
            better = new_margin < margin[idx]
            x_best[idx[better]] = x_new[better]
            margin[idx[better]] = new_margin[better]
    return x_best


def random_noise(
        x: torch.Tensor,
        eps: float,
        norm: str = "linf",
        generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random-noise baseline: a random point on the sphere of radius eps (the full budget:
    random signs for linf, uniform directions for l2/l1), clipped to [0, 1]."""
    x = x.detach().float()
    return _apply(x, eps * _unit_sphere(x, _check_norm(norm), generator), eps, norm)


def transfer(
        source_model: nn.Module,
        target_model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        attack_fn: Callable[..., torch.Tensor] | str,
        **kw,
) -> torch.Tensor:
    """Craft adversarials on ``source_model`` (a registry name or an attack callable) and
    return them on ``target_model``'s device; evaluating them on the target happens elsewhere.
    A transfer from the same weights without the defense layer sees through gradient masking."""
    fn = resolve_attack(attack_fn) if isinstance(attack_fn, str) else attack_fn
    adv = fn(source_model, x, y, **kw)
    return adv.to(_device_of(target_model, adv.device))


# --- randomized defenses -------------------------------------------------------------------

class EOT(nn.Module):
    """Averages a randomized model's logits over ``samples`` forward passes.

    For evaluation (a smoothed prediction) or for attacking the averaged logits. For the usual
    EOT attack, which averages the loss gradient instead, use ``pgd(..., eot_samples=n)``.
    """

    def __init__(self, model: nn.Module, samples: int = 10) -> None:
        super().__init__()
        self.model = model
        self.samples = int(samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(0)


@torch.no_grad()
def expected_accuracy(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        draws: int = 10,
        batch_size: int | None = None,
) -> float:
    """Accuracy in percent averaged over ``draws`` forward passes (for randomized defenses;
    equals the plain accuracy for a deterministic model)."""
    device = _device_of(model, x.device)
    batch_size = batch_size or x.shape[0]
    correct = 0.0
    with eval_mode(model):
        for _ in range(draws):
            for i in range(0, x.shape[0], batch_size):
                xb, yb = x[i:i + batch_size].to(device).float(), y[i:i + batch_size].to(device)
                correct += (_predict(model, xb) == yb).sum().item()
    return 100.0 * correct / (draws * x.shape[0])


# --- metrics -------------------------------------------------------------------------------

def robust_metrics(clean_correct: torch.Tensor, adv_correct: torch.Tensor) -> dict[str, float]:
    """Clean accuracy, robust accuracy and RobustART's AR, all in percent.

    AR = #(clean-correct and adv-correct) / #(clean-correct) x 100: the share of the correctly
    classified samples that survive the attack. When nothing is clean-correct AR is undefined
    and reported as NaN (not 0, which would read as "no robustness").

    Args:
        clean_correct: Bool per sample (N,), or per draw and sample (D, N).
        adv_correct: Same; the two broadcast. With a draw axis the metrics are computed per
            draw and averaged (expected accuracy / expected AR).
    """
    clean, adv = torch.broadcast_tensors(clean_correct.bool(), adv_correct.bool())
    if clean.numel() == 0:
        raise ValueError("robust_metrics: no samples")
    clean, adv = clean.reshape(-1, clean.shape[-1]).cpu(), adv.reshape(-1, adv.shape[-1]).cpu()
    n_clean = clean.sum(1).double()
    both = (clean & adv).sum(1).double()
    ar = torch.where(n_clean > 0, both / n_clean.clamp_min(1), torch.full_like(n_clean, float("nan")))
    return {
        "clean_acc": 100.0 * clean.double().mean().item(),
        "robust_acc": 100.0 * adv.double().mean().item(),
        "ar": 100.0 * ar.mean().item(),
    }


def worst_case(correct_by_attack: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample AND over attacks: a sample is robust only if it survives every attack."""
    if not correct_by_attack:
        raise ValueError("worst_case: no attacks given")
    tensors = torch.broadcast_tensors(*[t.bool() for t in correct_by_attack.values()])
    return torch.stack(tensors).all(0)


# --- registry ------------------------------------------------------------------------------
# Every entry is called as fn(model, x, y, *, eps, steps, generator, **extra). `steps=None`
# means the attack's default; single-shot attacks (fgsm, noise) accept and ignore steps and
# generator, so one parameter set can drive several attacks.

def _fgsm_entry(model, x, y, *, eps, steps=None, generator=None, eot_samples=1):
    return fgsm(model, x, y, eps, eot_samples=eot_samples)


def _pgd_entry(norm: str):
    def attack(model, x, y, *, eps, steps=None, generator=None, step_size=None, restarts=1,
               random_start=True, eot_samples=1, l1_sparsity=0.99):
        return pgd(model, x, y, eps, norm=norm, steps=20 if steps is None else steps,
                   step_size=step_size, restarts=restarts, random_start=random_start,
                   generator=generator, eot_samples=eot_samples, l1_sparsity=l1_sparsity)
    attack.__name__ = f"pgd_{norm}"
    return attack


def _cw_entry(model, x, y, *, eps=None, steps=None, generator=None, c=1.0, kappa=0.0, lr=0.01):
    """eps is the fixed L2 budget (max_norm); None leaves the perturbation unbounded."""
    return cw_l2(model, x, y, c=c, kappa=kappa, steps=100 if steps is None else steps, lr=lr,
                 max_norm=eps)


def _square_entry(model, x, y, *, eps, steps=None, generator=None, p_init=0.05):
    """steps is the query budget."""
    return square_linf(model, x, y, eps, queries=1000 if steps is None else steps,
                       p_init=p_init, generator=generator)


def _noise_entry(model, x, y, *, eps, steps=None, generator=None, norm="linf"):
    return random_noise(x, eps, norm=norm, generator=generator)


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "fgsm": _fgsm_entry,
    "pgd_linf": _pgd_entry("linf"),
    "pgd_l2": _pgd_entry("l2"),
    "pgd_l1": _pgd_entry("l1"),
    "cw_l2": _cw_entry,
    "square": _square_entry,
    "noise": _noise_entry,
}


def resolve_attack(name: str) -> Callable[..., torch.Tensor]:
    """The registry entry for ``name``; an unknown name is a UserError listing the known ones."""
    if name not in ATTACKS:
        raise UserError(f"unknown attack '{name}' (known: {', '.join(ATTACKS)})")
    return ATTACKS[name]


def _check_params(name: str, fn: Callable, params: dict) -> None:
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("model", "x", "y")]
    for key in params:
        if key not in accepted:
            raise UserError(f"attack '{name}': unknown parameter '{key}' (accepted: {', '.join(accepted)})")


def run_attack(
        name: str,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 64,
        *,
        draws: int = 1,
        progress: bool = False,
        **params,
) -> torch.Tensor:
    """Attack (x, y) in batches with the registry attack ``name`` and score the result.

    Batches move to the model's device; random draws continue across batches from
    ``params['generator']`` when given, so a seeded run is reproducible for a fixed batch size.

    Args:
        name: Key of ``ATTACKS``.
        batch_size: Images per attack call.
        draws: Forward passes scoring each adversarial image (randomized defenses).
        progress: Show a tqdm bar.
        **params: Attack parameters (eps, steps, generator, and the attack's extras).

    Returns:
        Bool correctness of the adversarial per sample (N,) on CPU, or (draws, N) when
        draws > 1 (``robust_metrics`` averages over that axis).
    """
    fn = resolve_attack(name)
    _check_params(name, fn, params)
    device = _device_of(model, x.device)
    correct = [torch.zeros(draws, 0, dtype=torch.bool)]
    for i in tqdm(range(0, x.shape[0], batch_size), desc=name, disable=not progress, leave=False):
        xb, yb = x[i:i + batch_size].to(device).float(), y[i:i + batch_size].to(device)
        adv = fn(model, xb, yb, **params)
        with eval_mode(model):
            correct.append(torch.stack([_predict(model, adv) == yb for _ in range(draws)]).cpu())
    out = torch.cat(correct, dim=1)
    return out[0] if draws == 1 else out
