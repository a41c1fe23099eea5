"""d2f_host: ComfyUI as the host library -- the layer that owns ComfyUI's model internals.

The ComfyUI nodes (``nodes/``) and the headless application (``d2f_app``, ``python -m training``)
reach models, checkpoints, LoRA files and the UNet only through these modules; the nodes use
ComfyUI's node API themselves (schema, folders, progress, interruption, sampling entry points).
``d2f_core`` (the math) and ``training`` (the engine) never import ComfyUI (``tests/test_layers.py``
enforces the rules).

    bootstrap       find ComfyUI (COMFYUI_PATH or the custom_nodes folder) and import it headless
    model_sampling  classify a model's sampling, build its alignment, the Diff2Flow patch and the
                    naive-flow model sampling, apply an objective's flow model
    checkpoints     load and check SD checkpoints, fingerprints, LoRA metadata of a run, a LoRA's
                    recommended sampling attached to a MODEL
    conditioning    text / VAE encoding and UNet keyword arguments (``context``, SDXL's ``y``)
    unet            adapters as weight wrappers on a clone, gradient checkpointing, the raw UNet
                    as the engine's and the headless sampler's ``network``
    sampling        the FM sigma grid and the FM samplers as ComfyUI SAMPLERs
    depth           depth models: the widened first convolution and the concat conditioning as
                    object patches, depth files (checked, loaded with ComfyUI's LoRA loader)
    marigold        Marigold-layout UNets converted zero-shot (ComfyUI's loader, v-prediction, widened)
    depth_estimate  image -> depth through ComfyUI's sampling (ensemble, resolution, progress, cancel)
    training_run    one training run assembled on a model (``prepare_run``), for the node and the CLI
    sampling_model  a checkpoint (+ LoRA) ready for headless FM sampling
    errors          ``HostError``, ``OptionError``: importable before ComfyUI

Only :mod:`d2f_host.bootstrap` and :mod:`d2f_host.errors` may be imported before ComfyUI is importable; the other modules
import ComfyUI at the top and are imported after :func:`~d2f_host.bootstrap.bootstrap_comfyui`
(headless) or inside a running ComfyUI (nodes).
"""
