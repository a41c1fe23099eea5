"""Every SD model family through the Diff2Flow nodes in a real ComfyUI 0.8.0.

Families (checkpoint files with random weights, see family_checkpoints): SDXL eps, SDXL v
(``v_pred``), SDXL v + ``ztsnr``, SD2-768-v, and SD2-768-v patched with the zero-terminal-SNR
option. For each: ComfyUI detects the file as that family; the patched model's data estimate equals
the unpatched model's at the same noise level; stock samplers run on it with SDXL's ``y``; the
training node trains on mixed latent sizes with caption dropout and its LoRA loads into the stock
loader with every key. Then two rules that only these families can break: a zsnr checkpoint gets
zero terminal SNR once (asking for it again rescales nothing), and SDXL caption dropout gives each
dropped sample the size embedding of its own bucket.

Time convention: FM sigma in [0, 1], 1 = noise (docs/MATH.md section 1). ComfyUI's unpatched
models take VE sigma k; the same VP state is at FM sigma k / (1 + k), with x_FM = (1 - sigma) x_VE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
from types import SimpleNamespace

import pytest
import torch
from comfy_harness import require_comfyui

require_comfyui()

import comfy.model_base  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_sampling as cms  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from family_checkpoints import (  # noqa: E402
    FAMILIES,
    SD2_V_CHECK_KEY,
    SDXL_POOLED_DIM,
    UNET_PREFIX,
    ZSNR_LAST_ALPHAS_CUMPROD,
    Family,
    family_state_dict,
    synthetic_conditioning,
    write_family_checkpoint,
)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from d2f_core.lora_metadata import LoraMetadata  # noqa: E402
from training import TrainConfig  # noqa: E402

NAMES = list(FAMILIES)
FILES = ["sdxl_eps", "sdxl_v", "sdxl_v_ztsnr", "sd2_768_v"]  # sd2_v_zsnr_option shares the SD2 file
# small latents keep the CPU time down: the UNets have one resolution level, so any size works
LATENT = (1, 4, 4, 4)
BUCKETS = ((4, 4), (5, 6))  # latent height, width of the two training buckets (32x32 and 40x48 px)
NODE_DATA_INPUTS = ("model", "latents", "positive", "negative")


# ---------------------------------------------------------------------- fixtures and helpers
@contextlib.contextmanager
def folder_replaced(kind: str, folder: pathlib.Path):
    saved = folder_paths.folder_names_and_paths[kind]
    folder_paths.folder_names_and_paths[kind] = ([str(folder)], saved[1])
    getattr(folder_paths, "filename_list_cache", {}).clear()
    try:
        yield folder
    finally:
        folder_paths.folder_names_and_paths[kind] = saved
        getattr(folder_paths, "filename_list_cache", {}).clear()


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """One intra-op thread on the CPU while this module runs (restored after). These UNets run on
    16-30 latent positions, too little work to split; on a 2-core machine shared with other jobs
    two OpenMP threads spin-wait for each other, and the module took 18 min instead of 1.7."""
    if torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoints(comfy_nodes, tmp_path_factory):
    """models/checkpoints as a temporary folder holding the family files (written on first use)."""
    folder = tmp_path_factory.mktemp("family_checkpoints")
    with folder_replaced("checkpoints", folder):
        yield folder


@pytest.fixture
def loras_dir(tmp_path, comfy_nodes):
    with folder_replaced("loras", tmp_path / "loras") as folder:
        folder.mkdir()
        yield folder


@pytest.fixture(scope="module")
def family_model(checkpoints):
    """``family_model(family) -> (file name, ModelPatcher)``: the family's checkpoint as ComfyUI's
    loader reads it (UNet only), loaded once per file."""
    loaded: dict[str, object] = {}

    def get(family: Family):
        write_family_checkpoint(family, checkpoints)
        if family.file_name not in loaded:
            out = comfy.sd.load_checkpoint_guess_config(
                str(checkpoints / family.file_name), output_vae=False, output_clip=False
            )
            loaded[family.file_name] = out[0]
        return family.file_name, loaded[family.file_name]

    return get


def alphas_cumprod_of(ms) -> torch.Tensor:
    return 1.0 / (1.0 + ms.sigmas.double() ** 2)


def adm_of(model, cond: list, width: int, height: int):
    """SDXL's ``y`` for a conditioning at a pixel size (None for models without ADM)."""
    extras = cond[0][1]
    if not getattr(model.model, "adm_channels", 0):
        return None
    return model.model.encode_adm(**{**extras, "width": width, "height": height, "device": torch.device("cpu")}).float()


def denoised_of(model, x: torch.Tensor, sigma: torch.Tensor, cond: list, y) -> torch.Tensor:
    """ComfyUI's own apply_model path (calculate_input, timestep, calculate_denoised)."""
    comfy.model_management.load_models_gpu([model])
    extra = {} if y is None else {"y": y}
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=cond[0][0], **extra).float()


@contextlib.contextmanager
def recording_unet(model):
    """Record what the UNet receives (x shape, timestep, y) for every call, whoever calls it."""
    unet = model.model.diffusion_model
    calls: list[SimpleNamespace] = []
    forward = unet.forward

    def record(x, timesteps=None, context=None, y=None, *args, **kwargs):
        calls.append(
            SimpleNamespace(
                shape=tuple(x.shape),
                t=timesteps.detach().float().cpu().clone(),
                y=None if y is None else y.detach().float().cpu().clone(),
            )
        )
        return forward(x, timesteps, context, y, *args, **kwargs)

    unet.forward = record
    try:
        yield calls
    finally:
        del unet.forward


def patch(nodes, model, zero_terminal_snr: bool):
    return nodes["D2F_ModelPatch"].execute(model, zero_terminal_snr)[0]


def train_node_kwargs(node, model, latents: list, positive: list, negative, output_name: str, **options) -> dict:
    """D2F_TrainLoRA's inputs (all lists: the node takes input lists) from TrainConfig-named options.

    The node's training inputs are the TrainConfig fields; inputs that are not (resume_from) take
    their schema default, optional ones without a default (pairs) stay unconnected.
    """
    values = {**dataclasses.asdict(TrainConfig(**options)), "output_name": output_name}
    inputs = node.define_schema().inputs
    kwargs = {"model": [model], "latents": latents, "positive": positive}
    if negative is not None:
        kwargs["negative"] = negative
    for inp in inputs:
        if inp.id in NODE_DATA_INPUTS:
            continue
        if inp.id in values:
            kwargs[inp.id] = [values[inp.id]]
        elif getattr(inp, "default", None) is not None:
            kwargs[inp.id] = [inp.default]
        elif not inp.optional:
            raise AssertionError(
                f"D2F_TrainLoRA input {inp.id!r} has no TrainConfig field and no default: update this helper"
            )
    return kwargs


def train_node(nodes, model, latents, positive, negative, output_name: str = "family_lora", **options):
    """(MODEL, LORA_MODEL, loss map, steps) of the training node (not its fifth output, the previews)."""
    node = nodes["D2F_TrainLoRA"]
    return tuple(
        node.execute(**train_node_kwargs(node, model, latents, positive, negative, output_name, **options)).args
    )[:4]


def mixed_size_data(family: Family, n_per_bucket: int = 2, seed: int = 0):
    """Latents in the two BUCKETS (one LATENT per bucket), one pooled caption per latent, and a
    negative whose pooled_output differs from every caption's."""
    gen = torch.Generator().manual_seed(seed)
    latents = [{"samples": torch.randn(n_per_bucket, 4, h, w, generator=gen) * 4} for h, w in BUCKETS]
    positive = [synthetic_conditioning(family, seed=seed + 1 + i) for i in range(n_per_bucket * len(BUCKETS))]
    negative = [synthetic_conditioning(family, seed=seed + 1000)]
    return latents, positive, negative


def save_lora(nodes, lora, name: str) -> str:
    return nodes["D2F_SaveLoRA"].execute(lora, name, False).result[0]


def integer_timesteps(family: Family) -> tuple[int, ...]:
    # at integer timesteps ComfyUI's unpatched model (which rounds its timestep) and the patched
    # one feed the UNet the same timestep. 999 only without zero terminal SNR: ComfyUI's zsnr
    # table stops at alphas_cumprod 4.9e-8 where a zero-SNR flow model is at pure noise.
    zsnr = family.comfy_zsnr or family.zero_terminal_snr_option
    return (0, 10, 250, 500, 750, 998) if zsnr else (0, 10, 250, 500, 750, 999)


# ---------------------------------------------------------------------- detection
@pytest.mark.parametrize("name", FILES)
def test_checkpoint_is_detected_as_its_family(comfy_nodes, family_model, name) -> None:
    family = FAMILIES[name]
    file_name, model = family_model(family)
    assert type(model.model.model_config).__name__ == family.config_class
    assert type(model.model).__name__ == family.model_class
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, cms.ModelSamplingDiscrete)
    assert isinstance(ms, cms.V_PREDICTION) == (family.prediction == "v") and isinstance(ms, cms.EPS)
    expected_type = (
        comfy.model_base.ModelType.V_PREDICTION if family.prediction == "v" else comfy.model_base.ModelType.EPS
    )
    assert model.model.model_type == expected_type
    last = float(alphas_cumprod_of(ms)[-1])
    if family.comfy_zsnr:
        assert last == pytest.approx(ZSNR_LAST_ALPHAS_CUMPROD, rel=1e-3)
    else:
        assert last == pytest.approx(4.6601e-3, rel=1e-3)  # SD's scaled_linear schedule
    # the pack's own loader reads the same file (no text encoder / VAE in it) as a flow model
    flow, clip, vae = comfy_nodes["D2F_CheckpointLoader"].execute(file_name, "None", 1.0, False).args
    flow_ms = flow.get_model_object("model_sampling")
    assert isinstance(flow_ms, cms.CONST) and flow_ms.prediction == family.prediction
    assert type(flow.model.model_config).__name__ == family.config_class and clip is None


def test_sd2_detection_reads_v_from_the_norm_spread() -> None:
    """The SD2 file is v-prediction because of the spread ComfyUI's check reads, not by accident."""
    sd = family_state_dict("sd2_768_v")
    config = comfy.model_detection.model_config_from_unet(sd, UNET_PREFIX)
    assert type(config).__name__ == "SD20"
    assert config.model_type(sd, UNET_PREFIX) == comfy.model_base.ModelType.V_PREDICTION
    flat = {**sd, UNET_PREFIX + SD2_V_CHECK_KEY: torch.zeros_like(sd[UNET_PREFIX + SD2_V_CHECK_KEY])}
    assert (
        comfy.model_detection.model_config_from_unet(flat, UNET_PREFIX).model_type(flat, UNET_PREFIX)
        == comfy.model_base.ModelType.EPS
    )


# ---------------------------------------------------------------------- patched vs unpatched
@pytest.mark.parametrize("name", NAMES)
def test_patched_denoised_equals_unpatched(comfy_nodes, family_model, name) -> None:
    """The alignment changes coordinates, not predictions: at the same VP state the patched model at
    FM sigma s and ComfyUI's unpatched model at VE sigma k = s / (1 - s) give the same data estimate."""
    family = FAMILIES[name]
    _, model = family_model(family)
    patched = patch(comfy_nodes, model, family.zero_terminal_snr_option)
    reference = model
    if family.zero_terminal_snr_option:  # the unpatched model with ComfyUI's own zero-SNR schedule
        reference = comfy_nodes["ModelSamplingDiscrete"]().patch(model, "v_prediction", True)[0]
    cond = synthetic_conditioning(family, seed=1)
    y = adm_of(model, cond, width=512, height=384)
    ms = patched.get_model_object("model_sampling")
    gen = torch.Generator().manual_seed(0)
    for t_int in integer_timesteps(family):
        sigma = ms.sigma(torch.tensor(float(t_int), dtype=torch.float64)).reshape(1)
        x = torch.randn(LATENT, generator=gen)
        ours = denoised_of(patched, x, sigma.float(), cond, y)
        k = sigma / (1 - sigma)
        theirs = denoised_of(reference, (x.double() / (1 - sigma)).float(), k.float(), cond, y)
        assert torch.isfinite(ours).all() and ours.abs().max() > 0
        # float32 rounding of the two paths differs by ~1e-6 of the largest value
        torch.testing.assert_close(
            ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item(), msg=lambda m, t_int=t_int: f"t={t_int}: {m}"
        )


# ---------------------------------------------------------------------- stock samplers
@pytest.mark.parametrize("name", NAMES)
def test_stock_samplers_run_on_the_patched_model_with_sdxl_y(comfy_nodes, family_model, name) -> None:
    family = FAMILIES[name]
    _, model = family_model(family)
    patched = patch(comfy_nodes, model, family.zero_terminal_snr_option)
    positive = synthetic_conditioning(family, seed=1, width=512, height=384)
    negative = synthetic_conditioning(family, seed=2, width=1024, height=1024)
    expected_y = [adm_of(model, positive, 512, 384), adm_of(model, negative, 1024, 1024)]
    latent = {"samples": torch.zeros(LATENT)}
    for sampler, scheduler in (("euler", "normal"), ("dpmpp_2m", "karras"), ("uni_pc", "simple")):
        with recording_unet(patched) as calls:
            (out,) = comfy_nodes["KSampler"]().sample(
                patched, 7, 4, 3.0, sampler, scheduler, positive, negative, latent
            )
        samples = out["samples"]
        assert samples.shape == LATENT and torch.isfinite(samples).all(), (sampler, scheduler)
        assert calls, "the sampler never called the UNet"
        if not family.pooled:
            assert all(c.y is None for c in calls)
            continue
        rows = torch.cat([c.y for c in calls])
        assert rows.shape[1] == 2816
        # every row is the positive's or the negative's y (pooled_output + its own width / height)
        which = [next((j for j, e in enumerate(expected_y) if torch.allclose(r, e[0], atol=1e-5)), None) for r in rows]
        assert None not in which and set(which) == {0, 1}, (sampler, which)


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("name", NAMES)
def test_training_node_on_mixed_sizes_gives_a_lora_the_stock_loader_loads_whole(
    comfy_nodes, family_model, loras_dir, caplog, name
) -> None:
    family = FAMILIES[name]
    file_name, base = family_model(family)
    latents, positive, negative = mixed_size_data(family)
    with recording_unet(base) as calls:
        trained, lora, losses, steps = train_node(
            comfy_nodes,
            base,
            latents,
            positive,
            negative,
            steps=4,
            batch_size=2,
            learning_rate=1e-2,
            rank=4,
            alpha=4.0,
            targets="all",
            caption_dropout=0.3,
            zero_terminal_snr=family.zero_terminal_snr_option,
            seed=3,
        )
    assert steps == 4 and len(losses["loss"]) == 4 and all(math.isfinite(v) for v in losses["loss"])
    assert {c.shape[-2:] for c in calls} == set(BUCKETS), "training did not see both latent sizes"
    if family.pooled:
        assert all(c.y is not None and c.y.shape == (c.shape[0], 2816) for c in calls)
    name_saved = save_lora(comfy_nodes, lora, f"{name} lora")
    with safe_open(str(loras_dir / name_saved), framework="pt") as f:
        meta = LoraMetadata.from_header(f.metadata())
    assert meta.prediction == family.prediction and meta.steps == 4
    caplog.set_level("WARNING")
    (loaded,) = comfy_nodes["LoraLoaderModelOnly"]().load_lora_model_only(base, name_saved, 1.0)
    assert "lora key not loaded" not in caplog.text
    assert len(loaded.patches) == len(lora) // 3  # every (up, down, alpha) became one patch
    # the stock-loaded LoRA changes the model, and the node's MODEL output is that model, patched
    x, sigma = torch.randn(LATENT), torch.tensor([0.5])
    cond = synthetic_conditioning(family, seed=5)
    y = adm_of(base, cond, 64, 64)
    flow = patch(comfy_nodes, loaded, family.zero_terminal_snr_option)
    plain = denoised_of(patch(comfy_nodes, base, family.zero_terminal_snr_option), x, sigma, cond, y)
    stock = denoised_of(flow, x, sigma, cond, y)
    assert not torch.allclose(plain, stock), "the LoRA changed nothing"
    if (
        not family.comfy_zsnr
    ):  # on a ztsnr checkpoint: test_zsnr_lora_and_trained_model_on_a_ztsnr_checkpoint_change_nothing
        node = denoised_of(trained, x, sigma, cond, y)
        torch.testing.assert_close(node, stock, rtol=1e-4, atol=1e-4 * stock.abs().max().item())


# ---------------------------------------------------------------------- zero terminal SNR on a ztsnr checkpoint: once
SIGMA_GRID = torch.tensor([0.03, 0.1, 0.3, 0.45, 0.6, 0.8, 0.9, 0.95, 0.99, 0.999])


def sampling_differences(a, b, family: Family, a_name: str, b_name: str) -> list[str]:
    """How two flow models differ as model samplings: the timestep each hands the UNet and the
    denoised it returns on the same states, and sigma_max (both that of ComfyUI's own zsnr table,
    4519 / 4520: the project keeps the table's finite last entry, docs/MATH.md section 9)."""
    cond = synthetic_conditioning(family, seed=1)
    y = adm_of(a, cond, 64, 64)
    x = torch.randn((len(SIGMA_GRID),) + LATENT[1:], generator=torch.Generator().manual_seed(4))
    if y is not None:
        y = y.expand(len(SIGMA_GRID), -1)
    cond_b = [[cond[0][0].expand(len(SIGMA_GRID), -1, -1), cond[0][1]]]
    what = f"{a_name} vs {b_name}"
    out = {}
    for label, m in ((a_name, a), (b_name, b)):
        with recording_unet(m) as calls:
            den = denoised_of(m, x, SIGMA_GRID, cond_b, y)
        out[label] = (calls[-1].t, den, float(m.get_model_object("model_sampling").sigma_max))
    problems = []
    (t_a, den_a, _), (t_b, den_b, _) = out[a_name], out[b_name]
    dt = (t_a - t_b).abs()
    if dt.max() > 1e-3:
        i = int(dt.argmax())
        problems.append(
            f"{what}: the timestep handed to the UNet differs by up to {dt.max():.3f} "
            f"(at sigma {SIGMA_GRID[i]:.3f}: {t_a[i]:.3f} vs {t_b[i]:.3f})"
        )
    rel = ((den_a - den_b).abs().max() / den_b.abs().max()).item()
    if rel > 1e-5:
        problems.append(f"{what}: the denoised output differs by {rel:.1e} (relative)")
    (_, _, max_a), (_, _, max_b) = out[a_name], out[b_name]
    if max_a != max_b:
        problems.append(f"{what}: sigma_max {max_a:.6f} vs {max_b:.6f}")
    for label, (_, _, sigma_max) in out.items():
        if not 0.9997 < sigma_max < 0.9998:
            problems.append(f"{label} has sigma_max {sigma_max:.6f}, not that of ComfyUI's zsnr table (0.99978)")
    return problems


def test_zero_terminal_snr_option_changes_nothing_on_a_ztsnr_checkpoint(comfy_nodes, family_model) -> None:
    """ComfyUI already gives a ``v_pred`` + ``ztsnr`` checkpoint a zero-SNR schedule;
    asking the patch for zero terminal SNR again must not rescale it a second time."""
    family = FAMILIES["sdxl_v_ztsnr"]
    _, model = family_model(family)
    off, on = patch(comfy_nodes, model, False), patch(comfy_nodes, model, True)
    problems = sampling_differences(on, off, family, "patch zero_terminal_snr=True", "patch zero_terminal_snr=False")
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_zsnr_lora_and_trained_model_on_a_ztsnr_checkpoint_change_nothing(comfy_nodes, family_model, loras_dir) -> None:
    """The same through the loader and the training node: a LoRA whose metadata says
    zero_terminal_snr true, loaded with the Checkpoint Loader, and the training node's MODEL output,
    sample exactly as the stock-loaded LoRA under the plain patch."""
    family = FAMILIES["sdxl_v_ztsnr"]
    file_name, base = family_model(family)
    latents, positive, negative = mixed_size_data(family, n_per_bucket=1)
    trained, lora, _, _ = train_node(
        comfy_nodes,
        base,
        latents,
        positive,
        negative,
        steps=2,
        batch_size=1,
        learning_rate=1e-2,
        targets="attention",
        zero_terminal_snr=False,
    )
    saved = save_lora(comfy_nodes, lora, "ztsnr lora")
    path = loras_dir / saved
    with safe_open(str(path), framework="pt") as f:
        meta = LoraMetadata.from_header(f.metadata())
    # what a LoRA trained on a zsnr model records, with the option on or off (its alignment has zero terminal SNR)
    save_file(
        comfy.utils.load_torch_file(str(path)),
        str(path),
        metadata=dataclasses.replace(meta, zero_terminal_snr=True).to_header(),
    )
    (stock,) = comfy_nodes["LoraLoaderModelOnly"]().load_lora_model_only(base, saved, 1.0)
    reference = patch(comfy_nodes, stock, False)
    loader = comfy_nodes["D2F_CheckpointLoader"]
    stock_name = "stock LoraLoaderModelOnly + patch(zero_terminal_snr=False)"
    problems = sampling_differences(
        loader.execute(file_name, saved, 1.0, False)[0],
        reference,
        family,
        "D2F_CheckpointLoader with a zero_terminal_snr=true LoRA",
        stock_name,
    )
    problems += sampling_differences(
        loader.execute(file_name, "None", 1.0, True)[0],
        patch(comfy_nodes, base, False),
        family,
        "D2F_CheckpointLoader(zero_terminal_snr=True, no LoRA)",
        "patch(zero_terminal_snr=False)",
    )
    problems += sampling_differences(trained, reference, family, "D2F_TrainLoRA's MODEL output", stock_name)
    assert not problems, "\n".join(dict.fromkeys(problems))


# ---------------------------------------------------------------------- SDXL caption dropout: each sample's own size
def test_sdxl_caption_dropout_uses_each_samples_own_size(comfy_nodes, family_model) -> None:
    """A dropped sample's unconditional ``y`` must carry that sample's width / height, not
    the first latent's. Checked on what the UNet receives, for two buckets of different sizes."""
    family = FAMILIES["sdxl_eps"]
    _, base = family_model(family)
    latents, positive, negative = mixed_size_data(family)
    with recording_unet(base) as calls:
        train_node(
            comfy_nodes,
            base,
            latents,
            positive,
            negative,
            steps=12,
            batch_size=2,
            learning_rate=1e-4,
            caption_dropout=0.9,
            seed=5,
        )
    uncond_pooled = negative[0][0][1]["pooled_output"][0]
    embed = base.model.embedder  # Timestep(256): SDXL's size embedding

    def size_part(height_px: int, width_px: int) -> torch.Tensor:
        return torch.cat([embed(torch.Tensor([height_px])), embed(torch.Tensor([width_px]))], dim=-1).flatten().float()

    sizes = {hw: size_part(hw[0] * 8, hw[1] * 8) for hw in BUCKETS}
    dropped = {hw: 0 for hw in BUCKETS}
    wrong = []
    for c in calls:
        hw = c.shape[-2:]
        for row in c.y:
            is_dropped = torch.allclose(row[:SDXL_POOLED_DIM], uncond_pooled, atol=1e-6)
            dropped[hw] += is_dropped
            got = row[SDXL_POOLED_DIM : SDXL_POOLED_DIM + 512]
            if not torch.allclose(got, sizes[hw], atol=1e-5):
                seen = next(
                    (f"{h * 8}x{w * 8}" for (h, w), s in sizes.items() if torch.allclose(got, s, atol=1e-5)),
                    "another size",
                )
                wrong.append(
                    f"{'dropped' if is_dropped else 'captioned'} sample of latent {hw[0]}x{hw[1]} "
                    f"({hw[0] * 8}x{hw[1] * 8} px) got the size of {seen}"
                )
    assert all(dropped.values()), (
        f"caption dropout hit no sample of some bucket, so this test checks nothing: {dropped}"
    )
    assert not wrong, f"{len(wrong)} samples carried the wrong size conditioning, e.g. " + "; ".join(sorted(set(wrong)))


@pytest.mark.parametrize("which", ["positive", "negative"])
def test_sdxl_conditioning_without_pooled_output_is_refused_clearly(comfy_nodes, family_model, which) -> None:
    family = FAMILIES["sdxl_eps"]
    _, base = family_model(family)
    latents, positive, negative = mixed_size_data(family, n_per_bucket=1)
    bare = [[[c[0][0], {}]] for c in (positive if which == "positive" else negative)]
    args = {"positive": positive, "negative": negative, which: bare}
    with pytest.raises(ValueError, match="pooled_output") as info:
        train_node(comfy_nodes, base, latents, args["positive"], args["negative"], steps=1)
    assert which in str(info.value), f"the error does not name the input: {info.value}"
