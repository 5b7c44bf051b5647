"""Training: stage 1 (eVAE, :mod:`.vae`) and stage 2 (one-step UNet + LoRA, :mod:`.diffusion`).

Shared pieces: :mod:`.data` (paired datasets), :mod:`.losses` (perceptual / edge-aware / GAN),
:mod:`.checkpoint` (safetensors checkpoints, resume), :mod:`.config` (dataclasses, config files)
and :mod:`.engine` (the accelerate step loop). Nothing heavy is imported here.
"""
