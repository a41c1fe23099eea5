"""Every node of this pack that takes a MODEL, against every kind of MODEL it can receive, in a real
ComfyUI 0.8.0 on tiny random-weight SD UNets (tests/comfy_harness.py).

The table below (``EXPECTED``) is the contract: for each (node, model kind) either ``works`` (the node
returns finite outputs of the right shapes) or ``refused: <substring>`` (a deliberate refusal, the pack's
``ValueError`` or ``HostError``, whose message contains the substring and names the input or the fix).
Anything else is a defect and fails the test with its type and message: a raw torch error (``expected
input to have 8 channels``), a ``KeyError``, an ``AttributeError``, a refusal with another message, or a
run that should have been refused and was not.

Model kinds:

- ``plain_eps`` / ``plain_v``: the tiny SD1.x-eps / SD2.x-v model as a checkpoint loader gives it;
- ``lora``: the eps model with a small random LoRA on its attention loaded by ComfyUI's own
  ``comfy.sd.load_lora_for_models`` (ComfyUI-native keys, as Train Diff2Flow LoRA's LORA_MODEL has them);
- ``zsnr``: the v model with zero terminal SNR from stock ``ModelSamplingDiscrete`` (v_prediction, zsnr);
- ``depth``: ``d2f_host.depth.widen_model`` of the v model (first convolution widened to take the image
  latent; what Diff2Flow Depth Model Loader's '(new: widen for training)' gives);
- ``patched`` / ``patched_zsnr``: the eps model through D2F_ModelPatch / the v model through
  D2F_ModelPatch with zero_terminal_snr on;
- ``patched_depth``: the depth model through D2F_ModelPatch (what Depth Model Loader gives for a trained
  depth file, and what Marigold Loader gives).

Sampling nodes get plain text conditioning for every kind: for an image-conditioned model ComfyUI's
``concat_cond`` then takes the image latent from the latent being sampled (``latent_image``), which is the
stock convention for image-conditioned models. Convention: FM sigma in [0, 1], sigma = 1 is noise.
"""

from __future__ import annotations

import pytest
import torch
from comfy_harness import CONTEXT_DIM, build_tiny_model, require_comfyui
from stand_ins import StandInClip, StandInVae

require_comfyui()

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

from d2f_core.lora import adapters_state_dict, make_adapter, select_target_modules  # noqa: E402
from d2f_host.depth import input_conv, is_image_conditioned, widen_model  # noqa: E402
from d2f_host.errors import HostError  # noqa: E402
from d2f_host.model_sampling import flow_sigma_max, is_flow_model, is_patched, patch_model  # noqa: E402
from training.pairs import load_pairs  # noqa: E402

KINDS = ["plain_eps", "plain_v", "lora", "zsnr", "depth", "patched", "patched_zsnr", "patched_depth"]
LATENT = (1, 4, 8, 8)  # 64 x 64 pixels
WORKS = "works"
NOT_PATCHED = "refused: connect it through 'Diff2Flow Model Patch'"
DEPTH_TRAIN = "refused: takes an image latent"
DEPTH_TEACHER = "refused: text-to-image teacher"
WIDENED_TWICE = "refused: already takes an image latent"
NOT_DEPTH = "refused: is not image-conditioned"
ZSNR_DROPPED = "refused: converted with zero terminal SNR"

# ------------------------------------------------------------------------------------------------------------
# the contract: what each node should do with each model kind
#
#                           plain_eps    plain_v      lora         zsnr         depth          patched  patched_zsnr patched_depth
EXPECTED: dict[str, dict[str, str]] = {
    "D2F_ModelPatch": dict(zip(KINDS, [WORKS, WORKS, WORKS, WORKS, WORKS, WORKS, WORKS, WORKS])),
    "D2F_FMScheduler": dict(
        zip(KINDS, [NOT_PATCHED, NOT_PATCHED, NOT_PATCHED, NOT_PATCHED, NOT_PATCHED, WORKS, WORKS, WORKS])
    ),
    "D2F_KSampler": dict(zip(KINDS, [WORKS, WORKS, WORKS, WORKS, WORKS, WORKS, WORKS, WORKS])),
    "D2F_TrainLoRA": dict(zip(KINDS, [WORKS, WORKS, WORKS, WORKS, DEPTH_TRAIN, WORKS, ZSNR_DROPPED, DEPTH_TRAIN])),
    "D2F_ReflowPairs": dict(zip(KINDS, [WORKS, WORKS, WORKS, WORKS, DEPTH_TEACHER, WORKS, WORKS, DEPTH_TEACHER])),
    "D2F_DepthModelLoader": dict(zip(KINDS, [WORKS, WORKS, WORKS, WORKS, WIDENED_TWICE, WORKS, WORKS, WIDENED_TWICE])),
    "D2F_DepthEstimate": dict(
        zip(KINDS, [NOT_DEPTH, NOT_DEPTH, NOT_DEPTH, NOT_DEPTH, WORKS, NOT_DEPTH, NOT_DEPTH, WORKS])
    ),
}
# Why: D2F_ModelPatch converts any eps / v diffusion model, image-conditioned or not (the depth estimate patches
# depth models itself), and an already patched one again (patching twice = once). D2F_FMScheduler's model input is
# "a flow model: the output of Diff2Flow Model Patch", so an unconverted model is refused naming that node.
# D2F_KSampler "converts an SD model if it is not converted yet": every kind samples (an image-conditioned one with
# the latent_image as its image, ComfyUI's convention). D2F_TrainLoRA trains on latents here (as for every kind):
# a depth model trains on image + depth pairs, so latents are refused; a model converted with zero terminal SNR
# trained with the zero_terminal_snr widget off (its default) would silently lose it, so that is refused naming
# the widget (Reflow Pairs and the KSampler honour the conversion as it is). D2F_ReflowPairs draws pairs from prompts alone: an image-conditioned teacher is refused.
# D2F_DepthModelLoader widens a base model: widening a depth model again is refused. D2F_DepthEstimate needs a
# depth model (it refuses a text-to-image model, naming the loaders).


# ------------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: these UNets see 64 latent positions, too little work to split on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def output_dir(comfy_nodes, tmp_path):
    """ComfyUI's output directory pointed at a temporary folder for one test (the reflow pairs go there)."""
    before = folder_paths.get_output_directory()
    folder = tmp_path / "output"
    folder.mkdir()
    folder_paths.set_output_directory(str(folder))
    yield folder
    folder_paths.set_output_directory(before)


def result(output) -> tuple:
    return tuple(output.result) if hasattr(output, "result") else tuple(output)


def cond(seed: int = 0, batch: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, CONTEXT_DIM, generator=gen), {}]]


def with_lora(model, seed: int = 0):
    """``model`` with a random LoRA (ComfyUI-native keys) on three attention layers, loaded by ComfyUI."""
    modules = dict(list(select_target_modules(model.model.diffusion_model, "attention").items())[:3])
    gen = torch.Generator().manual_seed(seed)
    adapters = {n: make_adapter("LoRA", m.weight.shape, 2, 2.0, gen) for n, m in modules.items()}
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.up.normal_(0, 0.1, generator=gen)
    loaded, _ = comfy.sd.load_lora_for_models(model, None, adapters_state_dict(adapters), 1.0, 0.0)
    assert len(loaded.patches) == len(modules)
    return loaded


def make_kind(nodes, kind: str):
    patch = nodes["D2F_ModelPatch"]
    if kind == "plain_eps":
        return build_tiny_model("eps")
    if kind == "plain_v":
        return build_tiny_model("v")
    if kind == "lora":
        return with_lora(build_tiny_model("eps"))
    if kind == "zsnr":
        return result(nodes["ModelSamplingDiscrete"]().patch(build_tiny_model("v"), "v_prediction", True))[0]
    if kind == "depth":
        return widen_model(build_tiny_model("v"))
    if kind == "patched":
        return result(patch.execute(build_tiny_model("eps"), False))[0]
    if kind == "patched_zsnr":
        return result(patch.execute(build_tiny_model("v"), True))[0]
    if kind == "patched_depth":
        return result(patch.execute(widen_model(build_tiny_model("v")), False))[0]
    raise AssertionError(kind)


def top_of_schedule(model) -> float:
    """The FM sigma ``model`` starts sampling from (converted with the plain Diff2Flow patch if it is not a flow
    model yet): 1 with zero terminal SNR from D2F_ModelPatch, just under 1 with stock zsnr, 0.936 for SD."""
    return flow_sigma_max(model if is_flow_model(model) else patch_model(model))


def check_latent(samples: torch.Tensor, shape=LATENT) -> None:
    assert tuple(samples.shape) == shape, f"latent of shape {tuple(samples.shape)}, expected {shape}"
    assert torch.isfinite(samples).all(), "non-finite latent"


def fm_chain(nodes, flow) -> None:
    """D2F_FMScheduler -> SamplerCustomAdvanced with D2F_FMEulerSampler, RandomNoise and CFGGuider (2 steps)."""
    (sigmas,) = result(nodes["D2F_FMScheduler"].execute(flow, 2, 1.0, 1.0))
    assert sigmas.shape == (3,) and torch.isfinite(sigmas).all() and float(sigmas[-1]) == 0.0
    assert float(sigmas[0]) == pytest.approx(flow_sigma_max(flow), abs=1e-6)
    (sampler,) = result(nodes["D2F_FMEulerSampler"].execute("euler"))
    (noise,) = result(nodes["RandomNoise"].execute(0))
    (guider,) = result(nodes["CFGGuider"].execute(flow, cond(1), cond(2), 2.0))
    out, denoised = result(
        nodes["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas, {"samples": torch.zeros(LATENT)})
    )
    check_latent(out["samples"])
    check_latent(denoised["samples"])


def smooth_images(batch: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").movedim(1, -1).contiguous()


# ------------------------------------------------------------------------------------------------------------
# one runner per node: run it on `model` and check its outputs (raises whatever the node raises)


def run_model_patch(nodes, model, env) -> None:
    (patched,) = result(nodes["D2F_ModelPatch"].execute(model, False))
    assert patched is not model and is_patched(patched)
    assert is_image_conditioned(patched) == is_image_conditioned(model)
    if env["kind"] == "zsnr":  # stock zsnr (alphas_cumprod[-1] = 4.9e-8) is respected: sigma_max just under 1
        assert 0.9997 < flow_sigma_max(patched) < 1.0
    if (
        env["kind"] == "patched_zsnr"
    ):  # patched again with zero_terminal_snr off: rebuilt without (patch_model's docstring)
        assert flow_sigma_max(patched) == pytest.approx(0.93596, abs=1e-5)
    fm_chain(nodes, patched)


def run_fm_scheduler(nodes, model, env) -> None:
    fm_chain(nodes, model)


def run_ksampler(nodes, model, env) -> None:
    (latent,) = result(
        nodes["D2F_KSampler"].execute(
            model=model,
            seed=0,
            steps=2,
            cfg=2.0,
            sampler="euler",
            shift=1.0,
            positive=cond(1),
            negative=cond(2),
            latent_image={"samples": torch.zeros(LATENT)},
            denoise=1.0,
        )
    )
    check_latent(latent["samples"])


def run_train_lora(nodes, model, env) -> None:
    node = nodes["D2F_TrainLoRA"]
    args = {i.id: [i.default] for i in node.define_schema().inputs if getattr(i, "default", None) is not None}
    gen = torch.Generator().manual_seed(0)
    args.update(
        model=[model],
        latents=[{"samples": torch.randn(2, 4, 8, 8, generator=gen)}],
        positive=[cond(3)],
        steps=[2],
        batch_size=[2],
        rank=[2],
        alpha=[2.0],
        output_name=[f"kinds_{env['kind']}"],
    )
    trained, lora, losses, steps, previews = result(node.execute(**args))
    assert steps == 2 and len(losses["loss"]) == 2
    assert all(torch.isfinite(torch.as_tensor(loss)).all() for loss in losses["loss"])
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
    assert is_flow_model(trained) and len(trained.patches) >= len(model.patches)
    # the MODEL output samples from where the input model does: a model converted with zero terminal SNR stays
    # one (as Reflow Pairs and the KSampler honour the input's conversion), or the conflict with the node's own
    # zero_terminal_snr widget is refused, not dropped in silence
    assert flow_sigma_max(trained) == pytest.approx(top_of_schedule(model), abs=1e-6), (
        f"the trained MODEL starts at sigma {flow_sigma_max(trained):.4f}, the input model at {top_of_schedule(model):.4f}: "
        "the input's zero terminal SNR was dropped"
    )
    assert lora.metadata.zero_terminal_snr == (top_of_schedule(model) > 0.99)
    assert previews.ndim == 4 and previews.shape[-1] == 3


def run_reflow_pairs(nodes, model, env) -> None:
    out = nodes["D2F_ReflowPairs"].execute(
        model=model,
        positive=cond(4, batch=2),
        count=2,
        width=64,
        height=64,
        steps=2,
        cfg=1.0,
        sampler="euler",
        seed=3,
        batch_size=2,
        folder=f"kinds_{env['kind']}",
    )
    (folder,) = result(out)
    pairs = load_pairs(folder)
    assert tuple(pairs.latents.shape) == (2, *LATENT[1:]) and torch.isfinite(pairs.latents).all()
    assert tuple(pairs.noise.shape) == (2, *LATENT[1:]) and torch.isfinite(pairs.noise).all()
    assert pairs.settings["sigma_max"] == pytest.approx(top_of_schedule(model), abs=1e-6)


def run_depth_model_loader(nodes, model, env) -> None:
    new = env["depth_nodes"].NEW_DEPTH_MODEL
    (depth,) = result(nodes["D2F_DepthModelLoader"].execute(model, new, 1.0))
    assert is_image_conditioned(depth) and not is_image_conditioned(model)
    assert input_conv(depth).weight.shape[1] == 2 * LATENT[1] and input_conv(model).weight.shape[1] == LATENT[1]
    assert is_patched(depth) == is_patched(model) and top_of_schedule(depth) == pytest.approx(
        top_of_schedule(model), abs=1e-6
    )
    # it samples with an image latent through the concat conditioning
    positive = [
        [cond(5)[0][0], {"concat_latent_image": torch.randn(LATENT, generator=torch.Generator().manual_seed(6))}]
    ]
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = comfy.sample.sample(
            depth, noise, 2, 1.0, "euler", "simple", positive, positive, torch.zeros(LATENT), disable_pbar=True, seed=0
        )
    check_latent(out)


def run_depth_estimate(nodes, model, env) -> None:
    grey, color, raw = result(
        nodes["D2F_DepthEstimate"].execute(model, StandInClip(), StandInVae(), smooth_images(), 2, 1, 0, 0, "grey")
    )
    assert tuple(raw.shape) == (1, 64, 64) and tuple(grey.shape) == tuple(color.shape) == (1, 64, 64, 3)
    for out in (grey, color, raw):
        assert torch.isfinite(out).all() and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


RUNNERS = {
    "D2F_ModelPatch": run_model_patch,
    "D2F_FMScheduler": run_fm_scheduler,
    "D2F_KSampler": run_ksampler,
    "D2F_TrainLoRA": run_train_lora,
    "D2F_ReflowPairs": run_reflow_pairs,
    "D2F_DepthModelLoader": run_depth_model_loader,
    "D2F_DepthEstimate": run_depth_estimate,
}
REFUSALS = (ValueError, HostError)  # the pack's deliberate refusals (HostError: d2f_host's, a RuntimeError)


def test_the_table_covers_every_node_with_a_model_input(comfy_nodes) -> None:
    """Every node of this pack with a MODEL input has a row with every kind (a new node gets a row)."""
    from comfy_api.latest import io

    with_model = set()
    for node_id, node in comfy_nodes.items():
        if node_id.startswith("D2F_") and hasattr(node, "define_schema"):
            if any(isinstance(i, io.Model.Input) for i in node.define_schema().inputs):
                with_model.add(node_id)
    assert with_model == set(EXPECTED) == set(RUNNERS)
    assert all(list(row) == KINDS for row in EXPECTED.values())


CASES = [(node, kind) for node in EXPECTED for kind in KINDS]


@pytest.mark.parametrize("node, kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_node_with_model_kind(comfy_nodes, loras_dir, output_dir, node, kind) -> None:
    import importlib
    import sys

    package = sys.modules[comfy_nodes["D2F_ModelPatch"].__module__].__package__
    env = {"kind": kind, "depth_nodes": importlib.import_module(package + ".depth_nodes")}
    expected = EXPECTED[node][kind]
    model = make_kind(comfy_nodes, kind)
    assert is_image_conditioned(model) == ("depth" in kind)
    image_conditioned_before = is_image_conditioned(model)
    try:
        RUNNERS[node](comfy_nodes, model, env)
    except AssertionError:
        raise
    except REFUSALS as exc:
        message = str(exc)
        if expected == WORKS:
            pytest.fail(f"{node} with a {kind} model should work but was refused: {type(exc).__name__}: {message}")
        wanted = expected.removeprefix("refused: ")
        assert wanted in message, (
            f"{node} with a {kind} model: refused, but the message lacks {wanted!r}: {type(exc).__name__}: {message}"
        )
    except Exception as exc:  # a raw torch error, KeyError, AttributeError ...: a defect
        pytest.fail(
            f"{node} with a {kind} model (expected {expected}) raised a raw {type(exc).__module__}."
            f"{type(exc).__name__}: {str(exc)[:400]}"
        )
    else:
        assert expected == WORKS, f"{node} with a {kind} model should be {expected}, but it ran"
    # the input MODEL is never changed
    assert is_image_conditioned(model) == image_conditioned_before
