"""`diffarc train`: train a built-in model (or a codec's trained parts) on Ray Train."""

from __future__ import annotations

import click

from ..codecs.registry import training_task_names
from .options import result_stream


def _check_crop(ctx, param, value: int) -> int:
    from ..codecs.task import TrainingTask  # light: no torch, so a usage error answers at once

    if value % TrainingTask.crop_multiple:
        raise click.BadParameter(f"the training crop {value} must be a multiple of {TrainingTask.crop_multiple}")
    return value


@click.command("train", context_settings={"show_default": True})
@click.argument("what", type=click.Choice(training_task_names()))
@click.option("--data", required=True, help="Folder of training images: local path or any fsspec URL. Never Kodak.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where to write the diffusers model folder.")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoints; re-running with the same work dir resumes from the newest one.")
@click.option("--config", "config_name", default="small",
              help="Model configuration: tiny for tests, small for a CPU, base for GPUs; hfd also has "
              "small-diffusion and small-diffusion-unshifted.")
@click.option("--steps", type=click.IntRange(min=1), default=2000, help="Total optimizer steps (a resumed run counts on).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help="Images per step per worker.")
@click.option("--crop", type=click.IntRange(min=16), default=256, callback=_check_crop,
              help="Training crop side in pixels (multiple of 8).")
@click.option("--lr", type=float, default=2e-4, help="AdamW learning rate; it falls linearly to 10 %% over the last quarter of --steps.")
@click.option("--workers", type=click.IntRange(min=1), default=1, help="Ray Train workers (data-parallel).")
@click.option("--gpu", is_flag=True, help="One GPU per worker.")
@click.option("--in-process", is_flag=True,
              help="Train in this process, without Ray: one worker, on the GPU with --gpu, else the CPU (a machine "
              "without Ray, one GPU, a quick run). Its checkpoints resume a Ray Train run's and the other way round.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many minutes of training, checkpointed and exported as if --steps were reached "
              "(the learning rate's warm-down still follows --steps); re-running continues.")
@click.option("--checkpoint-minutes", type=click.FloatRange(min=0), default=5.0, help="Minutes between checkpoints.")
@click.option("--report-seconds", type=click.FloatRange(min=0), default=30.0, help="Seconds between progress lines.")
@click.option("--autoencoder", default=None, help="diffusion: model reference of the frozen autoencoder (folder, URL, builtin:NAME).")
@click.option("--model", default=None,
              help="latent-denoise: the frozen latent diffusion model whose predictors are trained; decoder: the model whose "
              "autoencoder's decoder is fine-tuned (its encoder stays frozen); hfd: the hyperprior base model "
              "of a hyperprior config (default builtin:hyperprior-small). Folder, URL or builtin:NAME.")
@click.option("--init", default=None,
              help="Start a new run from these weights (folder, URL, builtin:NAME) of the same --config: fine-tuning.")
@click.option("--lpips-weights", envvar="DIFFARC_LPIPS_WEIGHTS", default=None,
              help="autoencoder: LPIPS-squeeze safetensors file for the perceptual loss [env: DIFFARC_LPIPS_WEIGHTS].")
@click.option("--lpips-weight", type=click.FloatRange(min=0), default=0.5, help="autoencoder: λ of the LPIPS loss (0: L1 only).")
@click.option("--save-dtype", type=click.Choice(["float32", "float16"]), default="float32", help="dtype of the written weights.")
@click.option("--max-images", type=click.IntRange(min=2), default=None, help="Use only the first N images.")
@click.option("--seed", type=int, default=0)
@click.option("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")
def train(what, data, out, work_dir, config_name, steps, batch_size, crop, lr, workers, gpu, in_process, minutes,
          checkpoint_minutes, report_seconds, autoencoder, model, init, lpips_weights, lpips_weight, save_dtype, max_images, seed, address):  # fmt: skip
    """Train a model. WHAT names a training task of the codec registry: `autoencoder` and `diffusion`
    (on an --autoencoder's latents) build the built-in latent diffusion model; `decoder` fine-tunes a
    --model's autoencoder decoder in the same latent space, which every latent codec then decodes with;
    `latent-denoise` trains
    that codec's predictors and entropy model for a frozen --model (written to MODEL/latent_denoise/
    they are found without naming them)."""
    from ..codecs.task import SettingsError, TrainSettings
    from ..pipeline.training import check_settings, run_training

    settings = TrainSettings(
        what=what, data=data, out=out, work_dir=work_dir, steps=steps, batch_size=batch_size, crop=crop, lr=lr,
        workers=workers, gpu=gpu, in_process=in_process, minutes=minutes, checkpoint_minutes=checkpoint_minutes, report_seconds=report_seconds,
        config=config_name, autoencoder=autoencoder, model=model, init=init, lpips_weights=lpips_weights, lpips_weight=lpips_weight,
        save_dtype=save_dtype, seed=seed, max_images=max_images,
    )  # fmt: skip
    if in_process and address:
        raise click.BadParameter("--in-process trains without Ray; it takes no cluster --address", param_hint="--address")
    try:  # a missing option is a usage error, named as the option
        check_settings(settings)
    except SettingsError as exc:
        raise click.BadParameter(str(exc), param_hint="--" + exc.setting.replace("_", "-")) from None
    metrics = run_training(settings, address)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    click.echo(f"wrote {out} (step {metrics.get('step')}; {shown})", file=result_stream())
