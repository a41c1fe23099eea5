"""The example workflows (example_workflows/*.json, ComfyUI UI / litegraph format) against the
node registry of a real ComfyUI with this pack loaded.

Each workflow must parse, use only registered node types, connect outputs to inputs of the
types the registered schemas declare, carry as many widget values as the nodes have widgets,
and, converted to the API format the frontend queues, pass ComfyUI's own
``execution.validate_prompt``. The checker is also run on broken copies (misspelt node id,
wrong link type, missing widget value) to show that it catches them.
"""

from __future__ import annotations

import asyncio
import copy
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from comfy_harness import ROOT, require_comfyui

require_comfyui()

WORKFLOW_DIR = ROOT / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
REQUIRED_WORKFLOWS = {"diff2flow_text_to_image", "diff2flow_image_to_image", "diff2flow_custom_sampler"}
# frontend-only nodes: never sent to the server, so never in the registry
UI_ONLY_TYPES = {"Note", "MarkdownNote"}
# ComfyUI's dataset loaders: their `folder` combo lists the subfolders of input/
DATASET_FOLDER_TYPES = {"LoadImageTextDataSetFromFolder", "LoadImageDataSetFromFolder"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# options that make the frontend add one more widget after the input's own (its value is saved too)
EXTRA_WIDGET_OPTIONS = (
    "control_after_generate",
    "image_upload",
    "video_upload",
    "animated_image_upload",
    "audio_upload",
)
TOP_LEVEL_KEYS = {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}
NODE_KEYS = {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties", "widgets_values"}


# ---------------------------------------------------------------------------------------------
# the registered schema of a node, as the frontend gets it from /object_info


def node_info(cls: type) -> dict[str, Any]:
    """``/object_info`` data of a node class: ``GET_NODE_INFO_V1()`` for V3 nodes (what
    ComfyUI's server sends the frontend), the V1 class attributes otherwise."""
    from comfy_api.internal import _ComfyNodeInternal

    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    returns = list(cls.RETURN_TYPES)
    return {
        "input": cls.INPUT_TYPES(),
        "output": returns,
        "output_name": list(getattr(cls, "RETURN_NAMES", None) or returns),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


def type_name(io_type: Any) -> str:
    """V1 combos are declared as the list of options; V3 combos as ``"COMBO"``."""
    return "COMBO" if isinstance(io_type, (list, tuple)) else str(io_type)


def input_specs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every required and optional input, in declaration order."""
    specs = []
    for category in ("required", "optional"):
        for name, spec in info["input"].get(category, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, type_name(spec[0]), options))
    return specs


def is_widget(io_type: str, options: dict) -> bool:
    return io_type in WIDGET_TYPES and not options.get("forceInput", False)


# INT inputs the frontend gives a "control after generate" widget unless the schema says otherwise
SEED_NAMES = ("seed", "noise_seed")


def widget_value_count(options: dict, name: str = "", io_type: str = "") -> int:
    """Widget values the frontend saves for one input: its own, plus upload widgets and the
    "control after generate" widget (set by the schema, or implied for INT seeds unless disabled)."""
    extra = sum(1 for key in EXTRA_WIDGET_OPTIONS if key != "control_after_generate" and options.get(key))
    control = options.get("control_after_generate")
    if control is None:
        control = io_type == "INT" and name in SEED_NAMES
    return 1 + extra + int(bool(control))


# ---------------------------------------------------------------------------------------------
# the checker


def check_workflow(wf: dict, registry: dict[str, type]) -> list[str]:
    """Everything wrong with a UI-format workflow, as readable lines (empty when it is sound)."""
    problems: list[str] = []
    missing = TOP_LEVEL_KEYS - set(wf)
    if missing:
        return [f"top-level keys missing: {sorted(missing)}"]
    if wf["version"] != 0.4:
        problems.append(f"version is {wf['version']!r}, expected 0.4")
    nodes = {}
    for node in wf["nodes"]:
        if not NODE_KEYS <= set(node):
            problems.append(f"node {node.get('id')}: keys missing: {sorted(NODE_KEYS - set(node))}")
            continue
        if node["id"] in nodes:
            problems.append(f"node id {node['id']} used twice")
        nodes[node["id"]] = node
    links = {}
    for link in wf["links"]:
        if len(link) != 6:
            problems.append(f"link {link!r}: expected [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        if link[0] in links:
            problems.append(f"link id {link[0]} used twice")
        links[link[0]] = link
    if problems:
        return problems
    if nodes and wf["last_node_id"] < max(nodes):
        problems.append(f"last_node_id {wf['last_node_id']} < largest node id {max(nodes)}")
    if links and wf["last_link_id"] < max(links):
        problems.append(f"last_link_id {wf['last_link_id']} < largest link id {max(links)}")

    infos = {}
    for nid, node in nodes.items():
        where = f"node {nid} ({node['type']})"
        if node["type"] in UI_ONLY_TYPES:
            if node["inputs"] or node["outputs"]:
                problems.append(f"{where}: a frontend-only note cannot have inputs or outputs")
            continue
        if node["type"] not in registry:
            problems.append(f"{where}: node type {node['type']!r} is not registered")
            continue
        if node["mode"] != 0:
            problems.append(f"{where}: mode {node['mode']} (muted/bypassed) in an example workflow")
        if node["properties"].get("Node name for S&R") != node["type"]:
            problems.append(f"{where}: properties['Node name for S&R'] should be {node['type']!r}")
        info = infos[nid] = node_info(registry[node["type"]])
        # outputs: same number, types and names as registered
        out_types = [type_name(t) for t in info["output"]]
        if len(node["outputs"]) != len(out_types):
            problems.append(f"{where}: {len(node['outputs'])} outputs, the node has {len(out_types)}")
        for slot, (out, reg_type) in enumerate(zip(node["outputs"], out_types)):
            if out["type"] != reg_type:
                problems.append(f"{where}: output {slot} has type {out['type']!r}, the node declares {reg_type!r}")
            if out["name"] != info["output_name"][slot]:
                problems.append(
                    f"{where}: output {slot} is named {out['name']!r}, the node calls it {info['output_name'][slot]!r}"
                )
        # inputs: known names with the registered types; required sockets connected
        specs = {name: (io_type, options) for name, io_type, options in input_specs(info)}
        for inp in node["inputs"]:
            if inp["name"] not in specs:
                problems.append(f"{where}: input {inp['name']!r} is not an input of the node")
            elif inp["type"] != specs[inp["name"]][0]:
                problems.append(
                    f"{where}: input {inp['name']!r} has type {inp['type']!r}, the node declares {specs[inp['name']][0]!r}"
                )
        linked = {inp["name"] for inp in node["inputs"] if inp.get("link") is not None}
        for name in info["input"].get("required", {}):
            io_type, options = specs[name]
            if not is_widget(io_type, options) and name not in linked:
                problems.append(f"{where}: required input {name!r} ({io_type}) is not connected")
        # widget values: one per widget input, plus control_after_generate / upload widgets
        expected = sum(widget_value_count(o, n, t) for n, t, o in input_specs(info) if is_widget(t, o))
        if len(node["widgets_values"]) != expected:
            problems.append(
                f"{where}: {len(node['widgets_values'])} widgets_values, the node has {expected} widget values"
            )

    for lid, (_, src, src_slot, dst, dst_slot, link_type) in links.items():
        where = f"link {lid} ({src}:{src_slot} -> {dst}:{dst_slot}, {link_type})"
        if src not in nodes or dst not in nodes:
            problems.append(f"{where}: connects a node that does not exist")
            continue
        if src_slot >= len(nodes[src]["outputs"]) or dst_slot >= len(nodes[dst]["inputs"]):
            problems.append(f"{where}: slot out of range")
            continue
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        if lid not in (out.get("links") or []):
            problems.append(f"{where}: not listed in the links of output {out['name']!r}")
        if inp.get("link") != lid:
            problems.append(f"{where}: input {inp['name']!r} points at link {inp.get('link')}")
        if out["type"] != link_type or inp["type"] != link_type:
            problems.append(
                f"{where}: output type {out['type']!r} / input type {inp['type']!r} differ from the link type"
            )
        if src in infos:
            reg_out = [type_name(t) for t in infos[src]["output"]]
            if src_slot < len(reg_out) and reg_out[src_slot] != link_type:
                problems.append(f"{where}: {nodes[src]['type']} output {src_slot} is {reg_out[src_slot]!r}")
        if dst in infos:
            reg_in = {name: t for name, t, _ in input_specs(infos[dst])}
            if reg_in.get(inp["name"]) != link_type:
                problems.append(f"{where}: {nodes[dst]['type']} input {inp['name']!r} is {reg_in.get(inp['name'])!r}")
    # the reverse direction: every reference in a node points at a link that says so
    for nid, node in nodes.items():
        for inp in node["inputs"]:
            lid = inp.get("link")
            if lid is not None and (lid not in links or links[lid][3] != nid):
                problems.append(f"node {nid}: input {inp['name']!r} refers to link {lid}, which does not end there")
        for slot, out in enumerate(node["outputs"]):
            for lid in out.get("links") or []:
                if lid not in links or links[lid][1:3] != [nid, slot]:
                    problems.append(f"node {nid}: output {slot} lists link {lid}, which does not start there")
    return problems


def to_api(wf: dict, registry: dict[str, type]) -> dict[str, dict]:
    """The API-format prompt the frontend would queue for this workflow: widget values mapped to
    the widget inputs in declaration order, links to ``[source node id, output slot]``."""
    links = {link[0]: link for link in wf["links"]}
    prompt = {}
    for node in wf["nodes"]:
        if node["type"] in UI_ONLY_TYPES or node["mode"] != 0:
            continue
        assert node["type"] in registry, f"node {node['id']}: node type {node['type']!r} is not registered"
        info = node_info(registry[node["type"]])
        ui_inputs = {inp["name"]: inp for inp in node["inputs"]}
        values: Iterator = iter(node["widgets_values"])
        inputs: dict[str, Any] = {}
        for name, io_type, options in input_specs(info):
            link = ui_inputs.get(name, {}).get("link")
            if is_widget(io_type, options):
                value = next(values)
                for _ in range(widget_value_count(options, name, io_type) - 1):
                    next(values)  # control_after_generate / upload widget: frontend only
                inputs[name] = value
            if link is not None:  # a socket, or a widget converted to an input
                inputs[name] = [str(links[link][1]), links[link][2]]
        prompt[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": inputs,
            "_meta": {"title": node.get("title", node["type"])},
        }
    return prompt


def validate(prompt: dict) -> tuple:
    import execution

    return asyncio.run(execution.validate_prompt("example-workflow-test", prompt, None))


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def by_type(prompt: dict, class_type: str) -> list[dict]:
    return [node for node in prompt.values() if node["class_type"] == class_type]


def source(prompt: dict, node: dict, name: str) -> dict:
    return prompt[node["inputs"][name][0]]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def comfy_files(comfy_nodes, tmp_path, monkeypatch):
    """models/checkpoints, models/loras and input/ redirected to empty temp folders; returns a
    function that creates the files a prompt names (empty checkpoints, a 1x1 PNG, dataset folders)."""
    import folder_paths
    from PIL import Image

    dirs = {name: tmp_path / name for name in ("checkpoints", "loras", "input")}
    for d in dirs.values():
        d.mkdir()
    for folder in ("checkpoints", "loras"):
        monkeypatch.setitem(
            folder_paths.folder_names_and_paths,
            folder,
            ([str(dirs[folder])], set(folder_paths.supported_pt_extensions)),
        )
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(folder_paths, "input_directory", str(dirs["input"]))

    def create_for(prompt: dict) -> None:
        for node in prompt.values():
            inputs = node["inputs"]
            if isinstance(inputs.get("ckpt_name"), str):
                (dirs["checkpoints"] / inputs["ckpt_name"]).write_bytes(b"")
            if isinstance(inputs.get("lora_name"), str) and inputs["lora_name"] != "None":
                (dirs["loras"] / inputs["lora_name"]).write_bytes(b"")
            if isinstance(inputs.get("depth_name"), str) and not inputs["depth_name"].startswith("(new"):
                (dirs["loras"] / inputs["depth_name"]).write_bytes(
                    b""
                )  # Depth Model Loader: a depth file in models/loras
            if node["class_type"] == "LoadImage":
                Image.new("RGB", (1, 1)).save(dirs["input"] / inputs["image"])
            if node["class_type"] in DATASET_FOLDER_TYPES and isinstance(inputs.get("folder"), str):
                (dirs["input"] / inputs["folder"]).mkdir(
                    parents=True, exist_ok=True
                )  # the folder combo lists input/ subfolders
        folder_paths.filename_list_cache.clear()

    return create_for


# ---------------------------------------------------------------------------------------------
# the shipped workflows


def test_the_three_example_workflows_exist() -> None:
    assert REQUIRED_WORKFLOWS <= {p.stem for p in WORKFLOWS}, [p.name for p in WORKFLOWS]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_the_registered_schemas(path, comfy_nodes) -> None:
    wf = load(path)
    problems = check_workflow(wf, comfy_nodes)
    assert not problems, "\n".join(problems)
    types = {node["type"] for node in wf["nodes"]}
    assert any(t.startswith("D2F_") for t in types), "an example workflow should use this pack's nodes"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_passes_comfyui_prompt_validation(path, comfy_nodes, comfy_files) -> None:
    wf = load(path)
    prompt = to_api(wf, comfy_nodes)
    comfy_files(prompt)
    ok, error, good_outputs, node_errors = validate(prompt)
    assert ok, (error, node_errors)
    assert node_errors == {}
    assert {nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"} <= set(good_outputs)
    # every output node (SaveImage; Save Diff2Flow LoRA and Plot Loss Graph in the training workflow)
    output_nodes = [nid for nid, n in prompt.items() if node_info(comfy_nodes[n["class_type"]])["output_node"]]
    assert sorted(good_outputs) == sorted(output_nodes)


def test_validation_reports_a_checkpoint_that_is_not_on_disk(comfy_nodes, comfy_files) -> None:
    """The converted widget values reach the right inputs: ckpt_name is checked against the
    (empty) checkpoints folder."""
    prompt = to_api(load(WORKFLOW_DIR / "diff2flow_text_to_image.json"), comfy_nodes)
    ok, _, _, node_errors = validate(prompt)
    assert not ok
    (loader_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "D2F_CheckpointLoader"]
    errors = node_errors[loader_id]["errors"]
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [("value_not_in_list", "ckpt_name")]


def test_text_to_image_graph(comfy_nodes) -> None:
    prompt = to_api(load(WORKFLOW_DIR / "diff2flow_text_to_image.json"), comfy_nodes)
    (sampler,) = by_type(prompt, "D2F_KSampler")
    assert source(prompt, sampler, "model")["class_type"] == "D2F_CheckpointLoader"
    assert source(prompt, sampler, "latent_image")["class_type"] == "EmptyLatentImage"
    assert sampler["inputs"]["positive"][0] != sampler["inputs"]["negative"][0]
    for name in ("positive", "negative"):
        assert source(prompt, sampler, name)["class_type"] == "CLIPTextEncode"
    assert {k: sampler["inputs"][k] for k in ("seed", "steps", "sampler", "shift", "denoise")} == {
        "seed": 42,
        "steps": 20,
        "sampler": "euler",
        "shift": 1.0,
        "denoise": 1.0,
    }
    (loader,) = by_type(prompt, "D2F_CheckpointLoader")
    assert loader["inputs"]["zero_terminal_snr"] is False  # an SD1.5 (eps) checkpoint
    (decode,) = by_type(prompt, "VAEDecode")
    assert decode["inputs"]["samples"][0] == next(k for k, n in prompt.items() if n is sampler)
    (save,) = by_type(prompt, "SaveImage")
    assert source(prompt, save, "images") is decode


def test_image_to_image_graph(comfy_nodes) -> None:
    prompt = to_api(load(WORKFLOW_DIR / "diff2flow_image_to_image.json"), comfy_nodes)
    (sampler,) = by_type(prompt, "D2F_KSampler")
    assert sampler["inputs"]["denoise"] == pytest.approx(0.6)
    encode = source(prompt, sampler, "latent_image")
    assert encode["class_type"] == "VAEEncode"
    assert source(prompt, encode, "pixels")["class_type"] == "LoadImage"
    (decode,) = by_type(prompt, "VAEDecode")
    assert source(prompt, decode, "samples") is sampler
    assert by_type(prompt, "SaveImage")


def test_custom_sampler_graph(comfy_nodes) -> None:
    prompt = to_api(load(WORKFLOW_DIR / "diff2flow_custom_sampler.json"), comfy_nodes)
    (sampler,) = by_type(prompt, "SamplerCustom")
    patch = source(prompt, sampler, "model")
    assert patch["class_type"] == "D2F_ModelPatch"
    assert source(prompt, patch, "model")["class_type"] == "CheckpointLoaderSimple"
    scheduler = source(prompt, sampler, "sigmas")
    assert scheduler["class_type"] == "D2F_FMScheduler"
    assert scheduler["inputs"]["model"] == sampler["inputs"]["model"]  # the schedule of the patched model
    assert source(prompt, sampler, "sampler")["class_type"] == "D2F_FMEulerSampler"
    assert sampler["inputs"]["add_noise"] is True and sampler["inputs"]["noise_seed"] == 42
    (decode,) = by_type(prompt, "VAEDecode")
    assert decode["inputs"]["samples"][1] == 0  # "output", not "denoised_output"
    assert source(prompt, decode, "samples") is sampler


def test_train_lora_graph(comfy_nodes) -> None:
    prompt = to_api(load(WORKFLOW_DIR / "diff2flow_train_lora.json"), comfy_nodes)
    (train,) = by_type(prompt, "D2F_TrainLoRA")
    assert source(prompt, train, "model")["class_type"] == "CheckpointLoaderSimple"
    dataset = source(prompt, train, "latents")
    assert dataset["class_type"] == "MakeTrainingDataset"
    assert train["inputs"]["latents"][1] == 0 and train["inputs"]["positive"] == [train["inputs"]["latents"][0], 1]
    assert source(prompt, dataset, "texts")["class_type"] == "LoadImageTextDataSetFromFolder"
    negative = source(prompt, train, "negative")
    assert negative["class_type"] == "CLIPTextEncode" and negative["inputs"]["text"] == ""
    assert train["inputs"]["objective"] == "diff2flow" and train["inputs"]["resume_from"] == "None"
    train_id = next(k for k, n in prompt.items() if n is train)
    (save,) = by_type(prompt, "D2F_SaveLoRA")
    assert save["inputs"]["lora"] == [train_id, 1]
    (graph,) = by_type(prompt, "LossGraphNode")
    assert graph["inputs"]["loss"] == [train_id, 2]
    (sampler,) = by_type(prompt, "D2F_KSampler")
    assert sampler["inputs"]["model"] == [train_id, 0]  # samples with the trained model
    (decode,) = by_type(prompt, "VAEDecode")
    assert source(prompt, decode, "samples") is sampler
    (image,) = by_type(prompt, "SaveImage")
    assert source(prompt, image, "images") is decode


# ---------------------------------------------------------------------------------------------
# the checker catches broken workflows


def node_of(wf: dict, node_type: str) -> dict:
    return next(n for n in wf["nodes"] if n["type"] == node_type)


def test_checker_catches_a_misspelt_node_id(comfy_nodes) -> None:
    wf = copy.deepcopy(load(WORKFLOW_DIR / "diff2flow_custom_sampler.json"))
    node = node_of(wf, "D2F_FMScheduler")
    node["type"] = node["properties"]["Node name for S&R"] = "D2F_FMSchedular"
    problems = check_workflow(wf, comfy_nodes)
    assert any("'D2F_FMSchedular' is not registered" in p for p in problems), problems


def test_checker_catches_a_wrong_link_type(comfy_nodes) -> None:
    wf = copy.deepcopy(load(WORKFLOW_DIR / "diff2flow_custom_sampler.json"))
    sigmas_link = next(link for link in wf["links"] if link[5] == "SIGMAS")
    sigmas_link[5] = "SAMPLER"
    problems = check_workflow(wf, comfy_nodes)
    assert any(f"link {sigmas_link[0]} " in p and "differ from the link type" in p for p in problems), problems


def test_checker_and_comfyui_catch_a_consistently_wrong_connection(comfy_nodes) -> None:
    """SAMPLER wired into SamplerCustom's sigmas, with every type in the file edited to agree:
    only the registered schema can tell, and both the checker and validate_prompt do."""
    wf = copy.deepcopy(load(WORKFLOW_DIR / "diff2flow_custom_sampler.json"))
    fm_sampler, scheduler, sampler = (
        node_of(wf, t) for t in ("D2F_FMEulerSampler", "D2F_FMScheduler", "SamplerCustom")
    )
    sigmas_input = next(i for i in sampler["inputs"] if i["name"] == "sigmas")
    link = next(link for link in wf["links"] if link[0] == sigmas_input["link"])
    scheduler["outputs"][0]["links"].remove(link[0])
    fm_sampler["outputs"][0]["links"].append(link[0])
    link[1], link[2], link[5] = fm_sampler["id"], 0, "SAMPLER"
    sigmas_input["type"] = "SAMPLER"
    problems = check_workflow(wf, comfy_nodes)
    assert any("SamplerCustom input 'sigmas' is 'SIGMAS'" in p for p in problems), problems
    ok, _, _, node_errors = validate(to_api(wf, comfy_nodes))
    assert not ok
    assert {"return_type_mismatch"} <= {e["type"] for errs in node_errors.values() for e in errs["errors"]}


def test_checker_catches_a_missing_widget_value(comfy_nodes) -> None:
    wf = copy.deepcopy(load(WORKFLOW_DIR / "diff2flow_text_to_image.json"))
    node = node_of(wf, "D2F_KSampler")
    node["widgets_values"].remove("fixed")  # the seed's control_after_generate value
    problems = check_workflow(wf, comfy_nodes)
    assert any("D2F_KSampler" in p and "widgets_values" in p for p in problems), problems


def test_checker_catches_an_unconnected_required_input(comfy_nodes) -> None:
    wf = copy.deepcopy(load(WORKFLOW_DIR / "diff2flow_image_to_image.json"))
    sampler = node_of(wf, "D2F_KSampler")
    latent = next(i for i in sampler["inputs"] if i["name"] == "latent_image")
    wf["links"] = [link for link in wf["links"] if link[0] != latent["link"]]
    for node in wf["nodes"]:
        for out in node["outputs"]:
            if out.get("links") and latent["link"] in out["links"]:
                out["links"].remove(latent["link"])
    latent["link"] = None
    problems = check_workflow(wf, comfy_nodes)
    assert any("required input 'latent_image' (LATENT) is not connected" in p for p in problems), problems


def test_train_previews_graph(comfy_nodes) -> None:
    prompt = to_api(load(WORKFLOW_DIR / "diff2flow_train_previews.json"), comfy_nodes)
    (train,) = by_type(prompt, "D2F_TrainLoRA")
    inputs = train["inputs"]
    assert inputs["preview_every"] == 100 and inputs["ema_decay"] == 0.999  # previews of the EMA weights
    checkpoint = source(prompt, train, "model")
    assert checkpoint["class_type"] == "CheckpointLoaderSimple" and source(prompt, train, "vae") is checkpoint
    assert inputs["vae"][1] == 2  # the checkpoint's VAE output
    preview_prompt = source(prompt, train, "preview_prompts")
    assert preview_prompt["class_type"] == "CLIPTextEncode" and preview_prompt["inputs"]["text"]
    assert source(prompt, train, "negative")["inputs"]["text"] == ""  # the previews' unconditional prompt
    train_id = next(k for k, n in prompt.items() if n is train)
    saved = [n for n in by_type(prompt, "SaveImage") if n["inputs"]["images"] == [train_id, 4]]
    assert len(saved) == 1 and saved[0]["inputs"]["filename_prefix"] == "diff2flow_previews"


def test_depth_graph(comfy_nodes) -> None:
    prompt = to_api(load(WORKFLOW_DIR / "diff2flow_depth.json"), comfy_nodes)
    (estimate,) = by_type(prompt, "D2F_DepthEstimate")
    loader = source(prompt, estimate, "model")
    assert loader["class_type"] == "D2F_DepthModelLoader" and loader["inputs"]["depth_name"].endswith(".safetensors")
    checkpoint = source(prompt, loader, "model")
    assert checkpoint["class_type"] == "CheckpointLoaderSimple"
    assert source(prompt, estimate, "clip") is checkpoint and source(prompt, estimate, "vae") is checkpoint
    assert source(prompt, estimate, "image")["class_type"] == "LoadImage"
    assert {k: estimate["inputs"][k] for k in ("steps", "ensemble_size", "processing_resolution", "colormap")} == {
        "steps": 0,
        "ensemble_size": 3,
        "processing_resolution": 768,
        "colormap": "spectral",
    }
    estimate_id = next(k for k, n in prompt.items() if n is estimate)
    previews = sorted(
        n["inputs"]["images"][1] for n in by_type(prompt, "PreviewImage") if n["inputs"]["images"][0] == estimate_id
    )
    assert previews == [0, 1]  # grey depth and the colour map
