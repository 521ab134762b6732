"""Denoisers on tiny random diffusers UNets: predictions consistent with the noise model, conditioning concatenated."""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel, UNet2DModel

from diffarc.codecs.parts.denoisers import DiffusionDenoiser, VelocityField, noise_schedule
from diffarc.codecs.parts.samplers import ddim, euler, linspace_schedule

TABLE = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def tiny_unet(in_channels=4, out_channels=4, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        in_channels=in_channels, out_channels=out_channels, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_eps_and_v_are_consistent_for_every_prediction_type(unet, prediction_type):
    denoiser = DiffusionDenoiser(unet, TABLE, prediction_type)
    x, t = torch.randn(2, 4, 8, 8), 600
    with torch.no_grad():
        output = unet(x, torch.full((2,), t)).sample
        x0, eps = denoiser(x, t)
    a, s = float(TABLE[t]) ** 0.5, (1 - float(TABLE[t])) ** 0.5
    assert torch.allclose(a * x0 + s * eps, x, atol=1e-5)  # x_t = √ᾱ·x̂0 + √(1 − ᾱ)·ε̂
    named = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]
    assert torch.allclose(named, output, atol=1e-5)  # the network's output is the quantity its type names


def test_an_unknown_prediction_type_is_refused(unet):
    with pytest.raises(ValueError, match="prediction type"):
        DiffusionDenoiser(unet, TABLE, "rectified")


def test_a_flow_model_is_a_diffusion_denoiser_on_its_own_line(unet):
    """A flow scheduler's σ grid becomes an ᾱ table; the denoiser asks the network for v at σ(ᾱ) on the
    flow's line, and a DDIM run over that table is the flow's Euler integration over the same σ."""
    table, prediction_type = noise_schedule(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0))
    assert prediction_type == "flow" and table[-1] == 0 and table[0] > 0.99
    denoiser = DiffusionDenoiser(unet, table, "flow")
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), 599
    sigma = (t + 1) / 1000
    x_vp = table[t].sqrt().float() * x0 + (1 - table[t]).sqrt().float() * eps
    with torch.no_grad():
        x0_hat, eps_hat = denoiser(x_vp, t)
        x_flow = (1 - sigma) * x0 + sigma * eps
        v = unet(x_flow, torch.full((2,), sigma * 1000)).sample
        assert torch.allclose(x0_hat, x_flow - sigma * v, atol=1e-4) and torch.allclose(eps_hat, x_flow + (1 - sigma) * v, atol=1e-4)
        # Per-image ᾱ as a tensor (latent-denoise's predicted t) gives each image its own σ.
        per_image = denoiser.predict(x_vp, torch.tensor([t, t]), torch.full((2, 1, 1, 1), float(table[t])))
        assert torch.allclose(per_image[0], x0_hat, atol=1e-4)
        schedule = linspace_schedule(table, 6)
        start = torch.randn(1, 4, 8, 8)
        sampled = ddim(denoiser, start, schedule)
        sigmas = [(step + 1) / 1000 for step in schedule.timesteps]
        flowed = euler(VelocityField(unet), start, sigmas[:-1])  # σ_first = 1: the same start point
        x0_last = flowed - sigmas[-2] * VelocityField(unet)(flowed, sigmas[-2])
        assert torch.allclose(sampled, x0_last, atol=1e-4)


def test_conditioning_is_concatenated_to_the_input_channels():
    unet = tiny_unet(in_channels=4 + 3)
    denoiser = DiffusionDenoiser(unet, TABLE, "epsilon")
    x, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        _, eps = denoiser(x, 300, cond)
        assert torch.allclose(eps, unet(torch.cat([x, cond], 1), torch.tensor([300])).sample, atol=1e-6)
        assert not torch.allclose(eps, denoiser(x, 300, torch.zeros_like(cond))[1])  # the base image matters


def test_a_text_conditioned_unet_gets_an_all_zero_context():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4),
    ).eval()  # fmt: skip
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        _, eps = DiffusionDenoiser(unet, TABLE, "epsilon")(x, 100)
        expected = unet(x, torch.full((2,), 100), encoder_hidden_states=torch.zeros(2, 1, 32)).sample
    assert torch.allclose(eps, expected, atol=1e-6)


def test_alpha_bar_reads_the_table_and_interpolates_fractional_timesteps(unet):
    denoiser = DiffusionDenoiser(unet, TABLE, "epsilon")
    assert denoiser.alpha_bar(250) == float(TABLE.double()[250])
    t = torch.tensor([250.0, 250.5, 999.0, 2000.0], requires_grad=True)
    values = denoiser.alpha_bar(t)
    expected = torch.tensor([TABLE[250], (TABLE[250] + TABLE[251]) / 2, TABLE[999], TABLE[999]])
    assert torch.allclose(values, expected, rtol=1e-6)
    values.sum().backward()  # differentiable in t: the latent-denoise timestep predictor trains through it
    assert t.grad[1] < 0 and t.grad[3] == 0


def test_predict_takes_per_image_timesteps_with_their_alpha_bar(unet):
    denoiser = DiffusionDenoiser(unet, TABLE, "epsilon")
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        x0, eps = denoiser.predict(x, t, denoiser.alpha_bar(t).view(-1, 1, 1, 1))
        for i, step in enumerate((100, 700)):
            one_x0, one_eps = denoiser(x[i : i + 1], step)
            assert torch.allclose(x0[i], one_x0[0], atol=1e-5) and torch.allclose(eps[i], one_eps[0], atol=1e-5)


def test_velocity_field_runs_the_network_at_scaled_time_on_x_and_cond():
    unet = tiny_unet(in_channels=4 + 2)
    field = VelocityField(unet, timestep_scale=1000.0)
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        v = field(x, 0.25, cond)
        assert torch.allclose(v, unet(torch.cat([x, cond], 1), torch.full((2,), 250.0)).sample, atol=1e-6)
    x0, eps = VelocityField.x0_eps(x, 0.25, v)
    assert torch.allclose(0.75 * x0 + 0.25 * eps, x, atol=1e-5)  # x_t = (1 − t)·x0 + t·ε
    assert torch.allclose(eps - x0, v, atol=1e-5)  # v = ε − x0
    per_image = VelocityField.x0_eps(x, torch.tensor([0.25, 0.25]), v)
    assert torch.allclose(per_image[0], x0) and torch.allclose(per_image[1], eps)
