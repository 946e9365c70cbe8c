import math

import pytest
import torch

from toolkit import diffusion as d


SCHED = d.CosineSchedule()


def test_schedule_identities():
    t = torch.linspace(0, 1, 801, dtype=torch.float64)
    alpha, sigma = d.alpha_sigma(t, SCHED)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    assert alpha[0] == 1 and sigma[0] == 0
    assert alpha[-1] < 1e-6 and abs(sigma[-1] - 1) < 1e-12
    assert (alpha[1:] <= alpha[:-1]).all(), "α must fall monotonically with t"
    mid = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    a, s = d.alpha_sigma(mid, SCHED)
    torch.testing.assert_close(d.snr(mid, SCHED), a**2 / s**2)


def test_cosine_formula_by_hand():
    # ᾱ(0.5) = cos²((0.5+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2) with s = 0.008.
    s = 0.008
    expected = math.cos((0.5 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    got = d.alpha_bar(torch.tensor(0.5, dtype=torch.float64), SCHED).item()
    assert got == pytest.approx(expected, rel=1e-12)
    assert len(d.train_timesteps(SCHED)) == 800


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    for t in (0.05, 0.4, 0.9):
        a, s = d.alpha_sigma(torch.tensor(t, dtype=torch.float64), SCHED)
        z = d.diffuse(x0, eps, a, s)
        v = d.v_from_x0_eps(x0, eps, a, s)
        torch.testing.assert_close(d.x0_from_v(z, v, a, s), x0)
        torch.testing.assert_close(d.eps_from_v(z, v, a, s), eps)
        torch.testing.assert_close(d.v_from_x0_z(z, x0, a, s), v)
        # seed 000 eq. 4 in ᾱ form: v = √ᾱ ε − √(1−ᾱ) x0
        ab = d.alpha_bar(torch.tensor(t, dtype=torch.float64), SCHED)
        torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)


def test_table_end_points():
    table = d.make_table(SCHED, 4)
    assert table.steps == 4 and table.t[0] == 1.0 and table.t[-1] == 0.0
    assert table.alpha[0] == 0.0 and table.sigma[0] == 1.0
    assert table.alpha[-1] == 1.0 and table.sigma[-1] == 0.0
    with pytest.raises(ValueError):
        d.make_table(SCHED, 0)


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_ddim_with_oracle_returns_x0(steps):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 16, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 16, generator=g, dtype=torch.float64)
    table = d.make_table(SCHED, steps)

    def oracle(z, t):
        # The true v for a data distribution that is a single point x0.
        a, s = d.alpha_sigma(t.to(torch.float64), SCHED)
        a, s = a[:, None, None], s[:, None, None]
        return d.v_from_x0_z(z, x0, a, s)

    seen = []
    out = d.sample_ddim(oracle, noise, table, callback=lambda i, z, x: seen.append(i))
    torch.testing.assert_close(out, x0)
    assert seen == list(range(steps))


def test_cfg_combine_and_guided_denoiser():
    calls = []

    def model(z, t, c):
        calls.append(z.shape[0])
        return c.mean(dim=(1, 2), keepdim=True).expand_as(z) + 1.0

    cond = torch.full((1, 2, 4), 2.0)
    den = d.guided_denoiser(model, cond, 3.0)
    v = den(torch.zeros(1, 2, 4), torch.zeros(1))
    # v_c = 3, v_u = 1 → v_u + w (v_c − v_u) = 1 + 3·2 = 7, from one batched call of 2.
    torch.testing.assert_close(v, torch.full((1, 2, 4), 7.0))
    assert calls == [2]
    folded = d.guided_denoiser(model, cond, 3.0, folded=True)
    torch.testing.assert_close(folded(torch.zeros(1, 2, 4), torch.zeros(1)), torch.full((1, 2, 4), 3.0))
    assert calls == [2, 1]


def test_loss_weightings_and_dropout():
    seen_cond = []

    def model(z, t, c):
        seen_cond.append(c.clone())
        return torch.zeros_like(z)

    x0 = torch.randn(256, 2, 4, generator=torch.Generator().manual_seed(0))
    cond = torch.ones(256, 2, 4)
    mse = d.v_loss(model, x0, cond, schedule=SCHED, generator=torch.Generator().manual_seed(3))
    snrw = d.v_loss(model, x0, cond, schedule=SCHED, generator=torch.Generator().manual_seed(3),
                    weighting="snr")
    assert mse > 0 and snrw > 0 and not torch.isclose(mse, snrw)
    dropped = (seen_cond[0].abs().sum(dim=(1, 2)) == 0).float().mean().item()
    assert 0.03 < dropped < 0.2, f"about 10% of conditioning should be dropped, got {dropped}"
    with pytest.raises(ValueError):
        d.v_loss(model, x0, cond, schedule=SCHED, generator=torch.Generator(), weighting="bad")
