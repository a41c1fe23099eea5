"""The embedded Diff2Flow demo: a tiny class-conditional digit-diffusion UNet (eps and v, SD's
scaled-linear schedule), its classifier and Fréchet distance, the demo (``python -m demo``) and
the pretraining script (``python -m demo.pretrain``). Time convention (docs/MATH.md section 1): FM
sigma in [0, 1], sigma = 1 is noise, ``x_sigma = (1 - sigma) x0 + sigma noise``, ``v = noise - x0``.
"""
