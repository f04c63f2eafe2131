import os
import pickle

import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers import UNet2DModel

import model


@pytest.mark.parametrize("preset,sizes", [("tiny", (32, 64)), ("tiny4", (32, 64)), ("small", (32, 128)),
                                          ("base", (128, 256))])
def test_every_preset_maps_1xHxW_to_1xHxW(preset, sizes):
    for size in sizes:
        with torch.device("meta"):  # shapes only: the base UNet at 256 would take seconds on a CPU
            unet = model.build_unet(size, preset)
            out = unet(torch.zeros(2, 1, size, size), torch.tensor([0, 999]), class_labels=torch.tensor([0, len(model.CLASSES)])).sample
        assert out.shape == (2, 1, size, size)
        assert unet.config.num_class_embeds == len(model.CLASSES) + 1 == 7


def test_parameter_counts_match_the_preset_descriptions():
    with torch.device("meta"):
        counts = {p: sum(x.numel() for x in model.build_unet(s, p).parameters())
                  for p, s in [("tiny", 32), ("tiny4", 64), ("small", 64), ("base", 256)]}
    assert counts["tiny"] < counts["tiny4"] < 1e6
    assert 3e6 < counts["small"] < 30e6
    assert 110e6 < counts["base"] < 118e6  # the standard diffusers 256x256 UNet is ~114M


def test_attention_sits_at_the_16x16_level():
    unet = model.build_unet(256, "base")
    assert unet.config.down_block_types == ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4


@pytest.mark.parametrize("preset,size", [("base", 64), ("tiny", 48), ("small", 16), ("nope", 64)])
def test_sizes_and_presets_that_cannot_work_are_clear_errors(preset, size):
    with pytest.raises(ValueError, match="preset"):
        model.build_unet(size, preset)


def test_class_label_changes_the_output_and_null_class_is_valid():
    torch.manual_seed(0)
    unet = model.build_unet(32, "tiny").eval()
    xt = torch.randn(1, 1, 32, 32).repeat(len(model.CLASSES) + 1, 1, 1, 1)
    t = torch.full((len(model.CLASSES) + 1,), 500)
    with torch.no_grad():
        eps = unet(xt, t, class_labels=torch.arange(len(model.CLASSES) + 1)).sample  # every class and the null class
    assert torch.isfinite(eps).all()
    for i in range(1, len(model.CLASSES) + 1):
        assert (eps[i] - eps[0]).abs().max() > 1e-4
    with pytest.raises(IndexError):  # there is no eighth embedding
        unet(xt[:1], t[:1], class_labels=torch.tensor([len(model.CLASSES) + 1]))


@pytest.mark.parametrize("multi_label", [False, True])
def test_class_vectors_start_distinct_and_near_the_timestep_embeddings_size(multi_label):
    # diffusers starts them N(0, 1), 7x the timestep embedding: a rare class's vector, met in one batch in twenty,
    # is then answered with speckle (docs/results.md, rare classes); all equal, the classes learn slower
    torch.manual_seed(0)
    unet = model.build_unet(64, "tiny", num_classes=14 if multi_label else 6, multi_label=multi_label)
    E = unet.class_embedding.weight.detach()  # (C + 1, D)
    time_emb = unet.time_embedding(unet.time_proj(torch.tensor([1, 500, 999]))).detach()  # (3, D)
    assert abs(E.std().item() - model.CLASS_STD) < 0.05
    assert E.norm(dim=1).max() < 3 * time_emb.norm(dim=1).mean()
    assert torch.cdist(E, E).add(torch.eye(len(E)) * 1e9).min() > 0.5 * E.norm(dim=1).mean()  # no two alike


def test_shift_divides_every_snr_and_stays_a_diffusers_schedule():
    linear, shifted = model.make_schedule().alphas_cumprod.double(), model.make_schedule(shift=2.0).alphas_cumprod.double()
    snr = lambda a: a / (1 - a)
    assert torch.allclose(snr(shifted), snr(linear) / 4, rtol=1e-4)  # SNR / shift^2 at every t
    ddim = model.diffusers_scheduler("ddim", model.make_schedule("v_prediction", 2.0).config)  # built from the config alone
    assert torch.allclose(ddim.alphas_cumprod.double(), shifted) and ddim.config.prediction_type == "v_prediction"


def test_forward_process_matches_the_formula_and_diffusers():
    alpha_bar = model.make_schedule().alphas_cumprod
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # Ho et al. linear schedule, by hand
    assert torch.allclose(alpha_bar.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)
    x0, eps, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 500, 999])
    xt = model.add_noise(x0, eps, t, alpha_bar)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert torch.allclose(xt, model.make_schedule().add_noise(x0, eps, t), atol=1e-6)
    assert torch.allclose(xt[0], x0[0], atol=0.05)  # t=0 is almost clean, t=999 almost pure noise
    assert torch.allclose(xt[3], eps[3], atol=0.05)


class CountCalls(torch.nn.Module):
    """Wraps the UNet and records the batch size of every forward."""
    def __init__(self, unet):
        super().__init__()
        self.unet, self.batches, self.config = unet, [], unet.config

    def forward(self, x, t, class_labels):
        self.batches.append(len(x))
        return self.unet(x, t, class_labels=class_labels)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 30), ("ddim", 8), ("dpm++", 8), ("ddim-2m", 8)])
def test_samplers_return_finite_images_with_the_expected_number_of_model_calls(sampler, steps):
    torch.manual_seed(0)
    unet = CountCalls(model.build_unet(32, "tiny").eval())
    labels = torch.tensor([2, 3, 5])
    x0 = model.sample(unet, labels, sampler=sampler, steps=steps, guidance=1.0)
    assert x0.shape == (3, 1, 32, 32) and torch.isfinite(x0).all() and x0.abs().max() <= 1
    assert unet.batches == [3] * steps  # w == 1: one conditional forward per step, no doubled batch
    unet.batches.clear()
    model.sample(unet, labels, sampler=sampler, steps=steps, guidance=3.0)
    assert unet.batches == [6] * steps  # w > 1: cond and null in one batched forward per step


class LinearEps(torch.nn.Module):
    """A stand-in eps model with a known answer: eps = 0.1 * x + k[label] (+ w * (k[label] - k[null]) if guided_w)."""
    def __init__(self, guided_w=None):
        super().__init__()
        self.k, self.guided_w = torch.linspace(-0.5, 0.5, len(model.CLASSES) + 1), guided_w
        self.config = model.build_unet(32, "tiny").config

    def forward(self, x, t, class_labels):
        k = self.k[class_labels].view(-1, 1, 1, 1)
        if self.guided_w is not None:  # the guided eps written out by hand, for the conditional label only
            k = self.k[len(model.CLASSES)] + self.guided_w * (k - self.k[len(model.CLASSES)])
        return UNet2DOutput(sample=0.1 * x + k)


EPS = model.make_schedule("epsilon")  # LinearEps outputs eps


@pytest.mark.parametrize("w", [0.0, 2.5])
def test_guidance_is_eps_null_plus_w_times_eps_cond_minus_eps_null(w):
    labels = torch.tensor([0, 4, 5])
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]
    guided = model.sample(LinearEps(), labels, "ddim", 10, guidance=w, generators=gens(), schedule=EPS)
    by_hand = model.sample(LinearEps(guided_w=w), labels, "ddim", 10, guidance=1.0, generators=gens(), schedule=EPS)
    assert torch.allclose(guided, by_hand, atol=1e-5)
    plain = model.sample(LinearEps(), labels, "ddim", 10, guidance=1.0, generators=gens(), schedule=EPS)
    assert (guided - plain).abs().max() > 1e-3  # guidance changed the images


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0), ("dpm++", 0), ("ddim-2m", 1)])
def test_each_image_depends_only_on_its_own_generator(sampler, eta):
    torch.manual_seed(0)
    unet = model.build_unet(32, "tiny").eval()
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    both = model.sample(unet, torch.tensor([1, 3]), sampler, 10, guidance=2.0, generators=gens([11, 12]), eta=eta)
    alone = model.sample(unet, torch.tensor([3]), sampler, 10, guidance=2.0, generators=gens([12]), eta=eta)
    assert torch.allclose(both[1], alone[0], atol=1e-3)  # batch-dependent CPU conv blocking moves ~1e-5
    assert (both[0] - both[1]).abs().max() > 1e-3
    if eta:  # the fresh noise changes the film
        plain = model.sample(unet, torch.tensor([3]), sampler, 10, guidance=2.0, generators=gens([12]))
        assert (plain - alone).abs().max() > 1e-3


def test_a_film_depends_on_the_direction_of_its_noise_not_on_its_spread(monkeypatch):
    # a draw's spread varies by ~1% from seed to seed; a deterministic sampler carried that excess into the film as grain
    torch.manual_seed(0)
    unet = model.build_unet(32, "tiny").eval()
    draw = lambda: model.sample(unet, torch.tensor([0, 4]), "ddim-2m", 10, guidance=1.25,
                                generators=[torch.Generator().manual_seed(s) for s in (5, 6)])
    plain, randn = draw(), torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: 1.03 * randn(*a, **k))  # every draw 3% wider
    assert torch.allclose(draw(), plain, atol=1e-5)


@pytest.mark.parametrize("sampler", list(model.SAMPLERS))
def test_every_sampler_starts_from_pure_noise_at_any_step_count(sampler):
    for steps in (1, 2, 25):
        timesteps = model.make_sampler(sampler, steps)[1]
        assert int(timesteps[0]) == model.NUM_TIMESTEPS - 1 and len(timesteps) == steps
        assert (timesteps[1:] < timesteps[:-1]).all()  # strictly from noise to clean


def test_ddim_2m_steps_are_spaced_in_noise_level_as_karras():
    alpha_bar = model.make_schedule().alphas_cumprod.double()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    for steps, rounding in ((10, 0.02), (25, 0.1), (50, 0.25)):  # t is an integer: the more steps, the coarser
        t = model.make_sampler("ddim-2m", steps)[1]
        assert t[0] == 999 and t[-1] == model.T_MIN  # from pure noise down to the last noisy step, then the film
        root = sigma[t] ** (1 / model.RHO)  # evenly spaced in sigma^(1/rho)
        assert (root.diff() / root.diff().mean() - 1).abs().max() < rounding
    most = model.NUM_TIMESTEPS - model.T_MIN  # the most distinct steps it has
    assert len(set(model.make_sampler("ddim-2m", most)[1].tolist())) == most


class GaussianEps(torch.nn.Module):
    """The exact eps of data whose pixels are N(M, S^2): E[eps | xt] = sqrt(1 - a) (xt - sqrt(a) M) / (a S^2 + 1 - a),
    a = alpha_bar_t. A perfect denoiser: a sampler fed it must draw pixels with mean M and spread S."""
    M, S = 0.1, 0.3
    config = UNet2DModel(sample_size=16, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                         up_block_types=("UpBlock2D",), norm_num_groups=8, layers_per_block=1, num_class_embeds=7).config
    schedule = model.make_schedule("epsilon")  # what sample() is told the model outputs
    alpha_bar = schedule.alphas_cumprod

    def forward(self, x, t, class_labels):
        a = self.alpha_bar[int(t)]
        return UNet2DOutput(sample=(1 - a).sqrt() * (x - a.sqrt() * self.M) / (a * self.S ** 2 + 1 - a))


class GaussianV(GaussianEps):
    """The same perfect denoiser on a shifted schedule, saying v = sqrt(a) eps - sqrt(1 - a) x0 instead of eps."""
    schedule = model.make_schedule("v_prediction", shift=2.0)
    alpha_bar = schedule.alphas_cumprod

    def forward(self, x, t, class_labels):
        a, eps = self.alpha_bar[int(t)], super().forward(x, t, class_labels).sample
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return UNet2DOutput(sample=a.sqrt() * eps - (1 - a).sqrt() * x0)


@pytest.mark.parametrize("oracle, sampler, steps, lo, eta", [
    (GaussianEps, "ddim-2m", 25, 0.97, 0), (GaussianEps, "ddim-2m", 10, 0.9, 0), (GaussianEps, "ddim", 25, 0.8, 0),
    (GaussianEps, "dpm++", 25, 0.85, 0), (GaussianEps, "ddpm", 1000, 0.97, 0), (GaussianEps, "ddim-2m", 50, 0.97, 1),
    # v on the shifted schedule: the last even step of ddim starts noisier, so it blurs more (0.68 S at 25 steps)
    (GaussianV, "ddim-2m", 25, 0.97, 0), (GaussianV, "ddim-2m", 10, 0.9, 0), (GaussianV, "ddim", 50, 0.8, 0),
    (GaussianV, "ddpm", 1000, 0.97, 0), (GaussianV, "ddim-2m", 50, 0.97, 1)])
def test_samplers_draw_the_mean_and_spread_of_a_known_gaussian(oracle, sampler, steps, lo, eta):
    x = model.sample(oracle(), torch.zeros(64, dtype=torch.long), sampler, steps, schedule=oracle.schedule,
                     eta=eta)  # eta: fresh noise at mid t, which a perfect denoiser takes out again
    assert x.mean().item() == pytest.approx(GaussianEps.M, abs=0.01)
    assert lo * GaussianEps.S < x.std().item() < 1.07 * GaussianEps.S  # blurred at worst, never much noisier than the data
    assert (x.abs() > 0.99).float().mean() < 0.005  # no saturation: the data itself has 0.16% of pixels past 0.99


def test_the_default_sampler_keeps_the_spread_that_ddim_loses_at_the_same_calls():
    # first-order DDIM ends each few-step run on a posterior mean: its images come out grey and flat
    spread = lambda s, n: model.sample(GaussianEps(), torch.zeros(64, dtype=torch.long), s, n,
                                       schedule=GaussianEps.schedule).std().item()
    for steps in (10, 25):
        assert abs(spread("ddim-2m", steps) - GaussianEps.S) < 0.5 * abs(spread("ddim", steps) - GaussianEps.S)


def test_bad_sampler_or_steps_are_clear_errors():
    with pytest.raises(ValueError, match=f"ddim-2m takes between 1 and {model.NUM_TIMESTEPS - model.T_MIN}"):
        model.make_sampler("ddim-2m", model.NUM_TIMESTEPS - model.T_MIN + 1)
    with pytest.raises(ValueError, match="unknown sampler"):
        model.make_sampler("euler-ish", 10)
    with pytest.raises(ValueError, match="steps"):
        model.make_sampler("ddim", 0)


def tiny_checkpoint():
    torch.manual_seed(0)
    unet = model.build_unet(32, "tiny")
    ema = model.build_unet(32, "tiny")
    opt = torch.optim.AdamW(unet.parameters())
    unet(torch.randn(2, 1, 32, 32), torch.tensor([1, 2]), class_labels=torch.tensor([0, 1])).sample.mean().backward()
    opt.step()
    return unet, {"model": unet.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scaler": None,
                  "step": 1, "unet_config": model.unet_config(unet), "classes": model.CLASSES, "image_size": 32,
                  "args": {"lr": 1e-4, "preset": "tiny"}, "rng": {"torch": torch.get_rng_state()}}


def test_checkpoint_round_trip_is_exact(tmp_path):
    unet, ckpt = tiny_checkpoint()
    model.save_checkpoint(tmp_path / "ckpt.pt", ckpt)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file was renamed, not left behind
    back = model.load_checkpoint(str(tmp_path))  # a run folder works as well as the file
    for k, v in ckpt["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["state"][0]["exp_avg"].equal(ckpt["optimizer"]["state"][0]["exp_avg"])
    assert back["classes"] == model.CLASSES and back["step"] == 1 and back["args"]["preset"] == "tiny"
    rebuilt = model.unet_from_checkpoint(back, ema=False)
    x, t, y = torch.randn(1, 1, 32, 32), torch.tensor([3]), torch.tensor([2])
    assert torch.equal(rebuilt(x, t, class_labels=y).sample, unet.eval()(x, t, class_labels=y).sample)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this object would run os.system and create the marker file
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_asks_to_unpickle_objects_is_refused_and_its_code_never_runs(tmp_path):
    _, ckpt = tiny_checkpoint()
    marker = tmp_path / "pwned"
    ckpt["args"] = Payload(marker)
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        torch.save(ckpt, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ValueError, match="refused"):
        model.load_checkpoint(str(bad))
    assert not marker.exists()


def test_foreign_and_missing_files_are_clear_errors(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        model.load_checkpoint(str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        model.load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="no such checkpoint"):
        model.load_checkpoint(str(tmp_path / "nothing.pt"))


def test_preset_auto_picks_a_model_that_fits_the_image_size():
    for size, name in [(32, "tiny"), (64, "tiny4"), (128, "small"), (256, "base"), (512, "base")]:
        assert model.pick_preset("auto", size) == name and model.pick_preset("small", size) == "small"
    assert model.build_unet(32).config.block_out_channels == model.PRESETS["tiny"][0]  # auto is the default
    with pytest.raises(ValueError, match="choose from auto, base"):
        model.build_unet(32, "huge")
