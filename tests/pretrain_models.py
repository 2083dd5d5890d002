"""Models for the pretraining command line in tests and benchmarks (``--models-from tests/pretrain_models.py:tiny``):
ComfyUI cannot detect these small UNets from a checkpoint file, so the command line builds them in-process."""
import tiny as tiny_models

# The tiny layout at twice the width, three levels of two blocks (64 px images with the tiny VAE: 32x32 latents).
SMALL_UNET = {**tiny_models.TINY_UNET, "model_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": [2, 2, 2],
              "transformer_depth": [1] * 6, "transformer_depth_output": [1] * 9}


def tiny():
    """The tests' tiny SD1.5-like MODEL (seeded), the hash prompt encoder and the golden tiny VAE."""
    return tiny_models.tiny_model(0), tiny_models.prompt_encoder(), tiny_models.tiny_vae()


def small():
    model = tiny_models.tiny_model(0, SMALL_UNET)
    tiny_models.fill_(model.model.diffusion_model, 0, scale=0.05)
    return model, tiny_models.prompt_encoder(), tiny_models.tiny_vae()
