"""Diff2Flow Reflow Pairs -> Train Diff2Flow LoRA (objective reflow) -> Diff2Flow Checkpoint Loader ->
Diff2Flow KSampler in a real ComfyUI 0.8.0, on tiny random SD1.5- and SDXL-shaped models: the pairs,
the training on them, the LoRA in stock loaders, and sampling at the LoRA's recommended steps and cfg.

Which steps and cfg the KSampler used is read off the UNet calls: one call per step (ComfyUI batches
the positive and negative rows of CFG into one call), two rows per call when cfg != 1, one at cfg 1.
"""

from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass

import pytest
import torch
from comfy_harness import CONTEXT_DIM, require_comfyui

require_comfyui()

import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
from family_checkpoints import UNET_PREFIX, synthetic_conditioning, write_family_checkpoint  # noqa: E402
from sd15_checkpoint import SD15_TINY_UNET, randomize_  # noqa: E402

from d2f_core.lora import adapters_state_dict, make_adapter, select_target_modules  # noqa: E402
from d2f_core.lora_metadata import LoraMetadata, read_lora_metadata  # noqa: E402
from training.files import save_lora  # noqa: E402
from training.pairs import load_pairs  # noqa: E402

SD15_UNET_ONLY = "d2f_tiny_sd15_unet.safetensors"


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """One intra-op thread on the CPU (restored after): these UNets see 16-64 latent positions, too
    little work to split, and the machine's cores are shared."""
    if torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def io_dirs(tmp_path, comfy_nodes):
    saved_out, saved_loras = folder_paths.get_output_directory(), folder_paths.folder_names_and_paths["loras"]
    folder_paths.set_output_directory(str(tmp_path / "output"))
    (tmp_path / "loras").mkdir()
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], saved_loras[1])
    yield tmp_path
    folder_paths.set_output_directory(saved_out)
    folder_paths.folder_names_and_paths["loras"] = saved_loras


def prompts(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, 77, CONTEXT_DIM, generator=gen), {}]]


def make_pairs(comfy_nodes, model, count: int, **overrides):
    args = dict(
        model=model,
        positive=prompts(2),
        count=count,
        width=64,
        height=64,
        steps=2,
        cfg=1.0,
        sampler="euler",
        seed=3,
        batch_size=2,
        folder="tiny",
    )
    args.update(overrides)
    return comfy_nodes["D2F_ReflowPairs"].execute(**args)[0]


def test_pairs_node_writes_deterministic_appendable_pairs(comfy_nodes, tiny_model, io_dirs) -> None:
    model = tiny_model("eps")
    folder = make_pairs(comfy_nodes, model, 4)
    assert folder.startswith(str(io_dirs / "output" / "diff2flow_pairs"))
    first = load_pairs(folder)
    assert first.latents.shape == (4, 4, 8, 8) and torch.isfinite(first.latents).all()
    assert first.prompt.tolist() == [0, 1, 0, 1]
    # a larger count appends: the first four pairs are the same bits
    more = load_pairs(make_pairs(comfy_nodes, model, 6))
    assert more.latents.shape[0] == 6
    assert torch.equal(more.latents[:4], first.latents) and torch.equal(more.noise[:4], first.noise)
    # another seed is another set of pairs, refused in the same folder
    with pytest.raises(ValueError):
        make_pairs(comfy_nodes, model, 6, seed=4)


def test_pairs_node_runs_pairs_config_options(comfy_nodes, tiny_model, io_dirs) -> None:
    """The options after folder (shift, shard_size, grid) reach the pairs like the CLI's flags; without them (an
    API prompt written before they existed) the node uses PairsConfig's defaults; the node refuses what
    PairsConfig refuses, before any compute."""
    from training.config import PairsConfig
    from training.pairs import pair_shards

    model = tiny_model("eps")
    # 4 steps: with 2 the sigma_min grid has no node a shift could move
    plain = make_pairs(comfy_nodes, model, 4, folder="plain", steps=4)  # no shift, shard_size or grid
    assert load_pairs(plain).settings["shift"] == PairsConfig().shift
    assert [(a, b) for a, b, _ in pair_shards(plain)] == [(0, 4)]  # one shard of the default size (256)
    shifted = make_pairs(comfy_nodes, model, 4, folder="shifted", steps=4, shift=3.0, shard_size=2)
    assert load_pairs(shifted).settings["shift"] == 3.0
    assert [(a, b) for a, b, _ in pair_shards(shifted)] == [(0, 2), (2, 4)]
    assert not torch.equal(load_pairs(shifted).latents, load_pairs(plain).latents)
    # grid: the default puts a node on the teacher's sigma_min; uniform is another set of pairs
    from d2f_host.model_sampling import alignment_of

    sigma_min = alignment_of(model).sigma_min
    assert (load_pairs(plain).settings["grid"], load_pairs(plain).settings["sigma_floor"]) == ("sigma_min", sigma_min)
    uniform = make_pairs(comfy_nodes, model, 4, folder="uniform", steps=4, grid="uniform")
    assert (load_pairs(uniform).settings["grid"], load_pairs(uniform).settings["sigma_floor"]) == ("uniform", 0.0)
    assert not torch.equal(load_pairs(uniform).latents, load_pairs(plain).latents)
    with pytest.raises(ValueError, match="shard_size 3 must be a multiple of batch_size 2"):
        make_pairs(comfy_nodes, model, 4, folder="bad", shard_size=3)
    with pytest.raises(ValueError, match="width must be a multiple of 8"):
        make_pairs(comfy_nodes, model, 4, folder="bad", width=68)
    assert not (io_dirs / "output" / "diff2flow_pairs" / "bad").exists()


def test_pairs_node_inverts_its_latents_into_the_folder(comfy_nodes, tiny_model, io_dirs) -> None:
    """The latents input: each image inverted through the teacher's ODE with its own caption (latents_positive,
    or positive when that is not connected), stored as inverted pairs beside the generated ones; appending more
    latents inverts only the new ones (the same bits for the old); count 0 inverts only."""
    from d2f_host.conditioning import cond_kwargs

    model = tiny_model("eps")
    gen = torch.Generator().manual_seed(7)
    samples = torch.randn(5, 4, 8, 8, generator=gen)
    captions = prompts(3, seed=4)
    folder = make_pairs(
        comfy_nodes, model, 2, latents={"samples": samples[:3]}, latents_positive=captions, folder="inverted"
    )
    pairs = load_pairs(folder)
    assert (pairs.generated_count, pairs.inverted_count) == (2, 3)  # 0 inverted if the input were ignored
    assert pairs.inverted.tolist() == [False, False, True, True, True] and pairs.prompt.tolist() == [0, 1, -1, -1, -1]
    # the images themselves, in the model's latent scale, with their own captions' UNet arguments
    torch.testing.assert_close(pairs.latents[2:], model.model.process_latent_in(samples[:3]), rtol=0, atol=0)
    probe = torch.zeros(4, 8, 8)
    for k in range(3):
        own = cond_kwargs(model, (captions[0][0][k : k + 1], {}), probe)["context"]
        assert torch.equal(pairs.captions[k]["context"], own)
    assert torch.isfinite(pairs.noise).all() and not torch.equal(pairs.noise[2], pairs.noise[3])
    # appending latents (count 0: no generated pairs asked, the folder keeps its two)
    five = [[torch.cat([captions[0][0], prompts(2, seed=5)[0][0]]), {}]]  # the first three captions, and two more
    more = load_pairs(
        make_pairs(comfy_nodes, model, 0, latents={"samples": samples}, latents_positive=five, folder="inverted")
    )
    assert (more.generated_count, more.inverted_count) == (2, 5)
    assert torch.equal(more.noise[2:5], pairs.noise[2:]) and torch.equal(more.latents[:5], pairs.latents)
    # without latents_positive, positive captions the latents: one for all
    only = load_pairs(
        make_pairs(comfy_nodes, model, 0, latents={"samples": samples[:2]}, positive=prompts(1), folder="only")
    )
    assert (only.generated_count, only.inverted_count) == (0, 2)
    assert torch.equal(only.captions[1]["context"], cond_kwargs(model, (prompts(1)[0][0], {}), probe)["context"])


def test_pairs_node_refuses_ambiguous_latents_inputs_before_compute(comfy_nodes, tiny_model, io_dirs) -> None:
    model = tiny_model("eps")
    latents = {"samples": torch.randn(3, 4, 8, 8)}
    for overrides, message in (
        (dict(latents_positive=prompts(3)), "latents_positive .* is connected, but latents is not"),
        (dict(count=0), "count 0 generates no pairs: set count, or connect latents"),
        (dict(latents=latents, positive=prompts(2)), "3 latents but 2 captions in positive: connect latents_positive"),
        (dict(latents=latents, latents_positive=prompts(2)), "3 latents but 2 captions in latents_positive"),
        (dict(latents={"samples": torch.randn(1, 4, 16, 8)}), "latent 0 is 64x128 px .* but the pairs are 64x64 px"),
    ):
        with pytest.raises(ValueError, match=message):
            make_pairs(comfy_nodes, model, overrides.pop("count", 2), folder="refused", **overrides)
    assert not (io_dirs / "output" / "diff2flow_pairs" / "refused").exists()


def test_training_mixes_inverted_pairs_at_inverted_share(comfy_nodes, tiny_model, io_dirs) -> None:
    """Train Diff2Flow LoRA's inverted_share reaches the run: the LoRA records it, and a share the pairs cannot
    give (no inverted pairs) is refused naming the input."""
    model = tiny_model("eps")
    mixed = make_pairs(comfy_nodes, model, 2, latents={"samples": torch.randn(2, 4, 8, 8)}, folder="mixed")
    plain = make_pairs(comfy_nodes, model, 2, folder="plain")
    node = comfy_nodes["D2F_TrainLoRA"]
    spec = {i.id: i for i in node.define_schema().inputs}
    base = {name: [getattr(i, "default", None)] for name, i in spec.items() if getattr(i, "default", None) is not None}
    base.update(model=[model], objective=["reflow"], steps=[2], rank=[2], batch_size=[2], inverted_share=[0.5])
    lora = node.execute(**{**base, "pairs": [mixed], "output_name": ["mixed"]}).args[1]
    assert lora.metadata.inverted_share == 0.5
    assert lora.metadata.grid_share == 0.5, "reflow's recommended grid share (the node's default) was not trained"
    with pytest.raises(ValueError, match="inverted_share: 0.5 draws inverted pairs, but the training data holds none"):
        node.execute(**{**base, "pairs": [plain], "output_name": ["plain"]})
    latents = {"latents": [{"samples": torch.randn(2, 4, 8, 8)}], "positive": [prompts(1)], "objective": ["diff2flow"]}
    with pytest.raises(ValueError, match="inverted_share 0.5 mixes reflow pairs .* but no pairs are connected"):
        node.execute(**{**base, **latents, "output_name": ["latents"]})


def test_reflow_without_pairs_is_refused_before_training(comfy_nodes, tiny_model, io_dirs) -> None:
    node = comfy_nodes["D2F_TrainLoRA"]
    spec = {i.id: i for i in node.define_schema().inputs}
    args = {name: [getattr(i, "default", None)] for name, i in spec.items() if getattr(i, "default", None) is not None}
    gen = torch.Generator().manual_seed(0)
    args.update(
        model=[tiny_model("eps")],
        latents=[{"samples": torch.randn(2, 4, 8, 8, generator=gen)}],
        positive=[prompts(1)],
        objective=["reflow"],
        steps=[2],
    )
    with pytest.raises(ValueError, match="pairs"):
        node.execute(**args)


# ---------------------------------------------------------------------- checkpoints, LoRAs and sampling
@dataclass(frozen=True)
class Case:
    """A model family the reflow chain runs on: its checkpoint file and conditioning shapes."""

    name: str
    file_name: str
    context_dim: int
    pooled: bool

    def cond(self, seed: int) -> list:
        """One conditioning entry of batch 1 (SDXL: with pooled_output, as CLIP Text Encode gives)."""
        if self.pooled:
            return synthetic_conditioning("sdxl_eps", seed=seed)
        gen = torch.Generator().manual_seed(seed)
        return [[torch.randn(1, 77, self.context_dim, generator=gen), {}]]


CASES = {
    c.name: c
    for c in (
        Case("sd15", SD15_UNET_ONLY, 768, False),
        Case("sdxl", "d2f_tiny_sdxl_eps.safetensors", 2048, True),
    )
}


def write_sd15_unet_only(path: pathlib.Path) -> None:
    """An SD1.5-shaped checkpoint holding only the UNet of sd15_checkpoint (no CLIP-L, no VAE: the
    loader returns None for them, and these tests use synthetic conditioning)."""
    import comfy.model_base
    import comfy.supported_models
    from safetensors.torch import save_file

    config = comfy.supported_models.SD15(dict(SD15_TINY_UNET))
    config.set_inference_dtype(torch.float16, None)
    unet = randomize_(
        comfy.model_base.BaseModel(config, device=torch.device("cpu")).diffusion_model, torch.Generator().manual_seed(0)
    )
    save_file({UNET_PREFIX + k: v.to(torch.float16).contiguous() for k, v in unet.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def checkpoints(comfy_nodes, tmp_path_factory):
    """models/checkpoints as a temporary folder; ``checkpoints(case) -> (file name, UNet-only MODEL)``
    writes and loads each file once."""
    folder = tmp_path_factory.mktemp("reflow_checkpoints")
    saved = folder_paths.folder_names_and_paths["checkpoints"]
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(folder)], saved[1])
    loaded = {}

    def get(case: Case):
        if case.name not in loaded:
            if case.name == "sd15":
                write_sd15_unet_only(folder / case.file_name)
            else:
                write_family_checkpoint("sdxl_eps", folder)
            model = comfy.sd.load_checkpoint_guess_config(
                str(folder / case.file_name), output_vae=False, output_clip=False
            )[0]
            loaded[case.name] = model
        return case.file_name, loaded[case.name]

    yield get
    folder_paths.folder_names_and_paths["checkpoints"] = saved


@dataclass
class Calls:
    """The UNet calls of one sampling run: the sigmas seen and how many rows were negative (CFG)."""

    sigmas: list
    uncond_rows: int = 0

    @property
    def steps(self) -> int:
        return len(set(self.sigmas))


def ksample(comfy_nodes, model, case: Case, steps: int, cfg: float, steps_cfg_from: str = "lora"):
    """Diff2Flow KSampler on a clone of ``model`` that records its UNet calls: (latent, Calls, ui text)."""
    counted, calls = model.clone(), Calls([])

    def wrapper(apply_model, args):
        calls.sigmas.append(round(float(args["timestep"][0]), 6))
        calls.uncond_rows += sum(1 for c in args["cond_or_uncond"] if c == 1)
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted.set_model_unet_function_wrapper(wrapper)
    out = comfy_nodes["D2F_KSampler"].execute(
        model=counted,
        seed=1,
        steps=steps,
        cfg=cfg,
        sampler="euler",
        shift=1.0,
        positive=case.cond(1),
        negative=case.cond(2),
        latent_image={"samples": torch.zeros(1, 4, 8, 8)},
        denoise=1.0,
        start="sigma_max",
        steps_cfg_from=steps_cfg_from,
    )
    return out.args[0]["samples"], calls, out.ui["text"][0]


def write_lora(model, path: pathlib.Path, metadata) -> None:
    """A small random LoRA on two attention layers of ``model``'s UNet, with ``metadata``."""
    modules = dict(list(select_target_modules(model.model.diffusion_model, "attention").items())[:2])
    gen = torch.Generator().manual_seed(0)
    adapters = {n: make_adapter("LoRA", m.weight.shape, 2, 2.0, gen) for n, m in modules.items()}
    for a in adapters.values():
        torch.nn.init.normal_(a.up, std=0.1, generator=gen)
    save_lora(path, adapters_state_dict(adapters), metadata)


def test_loader_and_ksampler_use_the_loras_recommended_steps_and_cfg(comfy_nodes, checkpoints, io_dirs) -> None:
    """A LoRA recording 3 steps at cfg 2.5: the loader's MODEL samples with exactly those unless the
    KSampler's steps_cfg_from is 'widgets'; models without such a LoRA use the widgets."""
    case = CASES["sdxl"]
    file_name, base = checkpoints(case)
    write_lora(
        base,
        io_dirs / "loras" / "recommends.safetensors",
        LoraMetadata("reflow", "eps", False, rank=2, alpha=2.0, sampling_steps=3, sampling_cfg=2.5, teacher_cfg=5.0),
    )
    write_lora(base, io_dirs / "loras" / "plain.safetensors", None)
    loader = comfy_nodes["D2F_CheckpointLoader"]
    model = loader.execute(file_name, "recommends.safetensors", 1.0, False).args[0]

    by_lora, calls, text = ksample(comfy_nodes, model, case, steps=5, cfg=7.0)
    assert (calls.steps, calls.uncond_rows) == (3, 3), (
        f"sampled {calls.steps} steps with {calls.uncond_rows} negative rows: {text}"
    )
    assert "3 steps, cfg 2.5" in text and "recommends.safetensors" in text, text
    same, _, _ = ksample(comfy_nodes, model, case, steps=3, cfg=2.5, steps_cfg_from="widgets")
    torch.testing.assert_close(by_lora, same, rtol=0, atol=0)  # the recorded cfg, not only "some guidance"
    other_cfg, _, _ = ksample(comfy_nodes, model, case, steps=3, cfg=7.0, steps_cfg_from="widgets")
    assert not torch.allclose(by_lora, other_cfg)

    # widgets win when asked; cfg 1 skips the negative pass
    _, calls, text = ksample(comfy_nodes, model, case, steps=2, cfg=1.0, steps_cfg_from="widgets")
    assert (calls.steps, calls.uncond_rows) == (2, 0) and "recommends 3 steps, cfg 2.5" in text, text
    # no LoRA, or a LoRA without Diff2Flow metadata: the widgets
    for lora in ("None", "plain.safetensors"):
        plain = loader.execute(file_name, lora, 1.0, False).args[0]
        _, calls, text = ksample(comfy_nodes, plain, case, steps=2, cfg=3.0)
        assert (calls.steps, calls.uncond_rows) == (2, 2), (lora, text)
    with pytest.raises(ValueError, match="steps_cfg_from"):
        ksample(comfy_nodes, model, case, steps=2, cfg=1.0, steps_cfg_from="lora please")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reflow_chain_from_pairs_to_few_step_sampling(comfy_nodes, checkpoints, io_dirs, caplog, case) -> None:
    """Pairs node -> 3 reflow training steps -> Save -> the LoRA loads whole in stock
    LoraLoaderModelOnly -> Diff2Flow Checkpoint Loader + KSampler sample at its recorded 2 steps, cfg 1
    (and so does the training node's own MODEL output)."""
    case = CASES[case]
    file_name, base = checkpoints(case)
    folder = (
        comfy_nodes["D2F_ReflowPairs"]
        .execute(
            model=base,
            positive=case.cond(1) + case.cond(2),
            negative=case.cond(3),
            count=2,
            width=64,
            height=64,
            steps=2,
            cfg=2.0,
            sampler="euler",
            seed=3,
            batch_size=2,
            folder=f"tiny_{case.name}",
        )
        .args[0]
    )
    pairs = load_pairs(folder)
    assert (
        pairs.latents.shape == (2, 4, 8, 8) and torch.isfinite(pairs.latents).all() and pairs.prompt.tolist() == [0, 1]
    )

    node = comfy_nodes["D2F_TrainLoRA"]
    spec = {i.id: i for i in node.define_schema().inputs}
    args = {name: [getattr(i, "default", None)] for name, i in spec.items() if getattr(i, "default", None) is not None}
    args.update(
        model=[base],
        pairs=[folder],
        objective=["reflow"],
        steps=[3],
        rank=[2],
        alpha=[2.0],
        batch_size=[2],
        output_name=[f"reflowed_{case.name}"],
    )
    trained, lora, losses, steps, previews = node.execute(**args).args
    assert previews.shape == (1, 1, 1, 3)  # previews off: the 1x1 placeholder
    assert steps == 3 and len(losses["loss"]) == 3 and all(torch.isfinite(torch.tensor(losses["loss"])))
    (name,) = comfy_nodes["D2F_SaveLoRA"].execute(lora, f"reflowed_{case.name}", False).args
    meta = read_lora_metadata(io_dirs / "loras" / name)
    assert (meta.objective, meta.teacher_cfg, meta.sampling_defaults()) == ("reflow", 2.0, ("euler", 2, 1.0))

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        (loaded,) = comfy_nodes["LoraLoaderModelOnly"]().load_lora_model_only(base, name, 1.0)
    assert loaded.patches and "lora key not loaded" not in caplog.text
    assert len(loaded.patches) == len(lora) // 3  # up, down and alpha per adapted weight: every one applied

    model = comfy_nodes["D2F_CheckpointLoader"].execute(file_name, name, 1.0, False).args[0]
    for source in (model, trained):
        _, calls, text = ksample(comfy_nodes, source, case, steps=20, cfg=7.0)
        assert (calls.steps, calls.uncond_rows) == (2, 0), text


def test_pairs_with_latents_positive_or_an_unused_negative_are_refused(comfy_nodes, tiny_model, io_dirs) -> None:
    """Pairs bring their own images, prompts and negative: latents / positive beside them, or a negative
    with previews off, would be dropped silently; each is refused before training, naming the inputs."""
    model = tiny_model("eps")
    folder = make_pairs(comfy_nodes, model, 2)
    node = comfy_nodes["D2F_TrainLoRA"]
    spec = {i.id: i for i in node.define_schema().inputs}
    base = {name: [getattr(i, "default", None)] for name, i in spec.items() if getattr(i, "default", None) is not None}
    base.update(
        model=[model],
        pairs=[folder],
        objective=["reflow"],
        steps=[1],
        rank=[2],
        batch_size=[2],
        output_name=["refused"],
    )
    latents = [{"samples": torch.randn(2, 4, 8, 8)}]
    for extra, named in (
        ({"latents": latents}, "pairs and latents"),
        ({"positive": [prompts(1)]}, "pairs and positive"),
        ({"latents": latents, "positive": [prompts(1)]}, "pairs and latents / positive"),
        ({"negative": [prompts(1)]}, "negative is connected"),
    ):
        with pytest.raises(ValueError, match=named):
            node.execute(**base, **extra)
    assert not any((io_dirs / "loras").iterdir())  # refused before anything was written
    # the pairs alone train
    assert node.execute(**base).args[3] == 1


def test_pairs_of_an_image_conditioned_teacher_are_refused_before_compute(comfy_nodes, tiny_model, io_dirs) -> None:
    """A depth-widened teacher needs an image latent the pairs cannot give: a clear refusal, not a torch error."""
    from d2f_host.depth import widen_model

    with pytest.raises(ValueError, match="text-to-image teacher"):
        make_pairs(comfy_nodes, widen_model(tiny_model("eps")), 2)
    assert not (io_dirs / "output" / "diff2flow_pairs").exists()
