"""Every node of the pack is documented: a description, a tooltip on every input and output,
a common id prefix and a category of its own."""

from __future__ import annotations

from comfy_harness import require_comfyui

require_comfyui()


def test_every_node_has_description_and_tooltips(comfy_nodes) -> None:
    ours = {k: v for k, v in comfy_nodes.items() if k.startswith("D2F_")}
    assert len(ours) == 11  # 7 + Diff2Flow Reflow Pairs + the three depth nodes
    missing = []
    for node_id, cls in ours.items():
        schema = cls.define_schema()
        assert schema.node_id == node_id and schema.category.startswith("Diff2Flow")
        if not schema.description:
            missing.append(f"{node_id}: description")
        for item in [*schema.inputs, *schema.outputs]:
            if not getattr(item, "tooltip", None):
                missing.append(f"{node_id}.{item.id or item.display_name}")
    assert missing == []


def test_training_seeds_stay_fixed_between_runs(comfy_nodes) -> None:
    """The front-end gives an INT named seed a "control after generate" widget (randomize) unless the
    schema says otherwise: a randomized training seed changes every run and breaks resume. The
    training and reflow-pairs nodes turn it off; the KSampler keeps it (a fresh image per run)."""

    def seed_options(node_id: str) -> dict:
        info = comfy_nodes[node_id].GET_NODE_INFO_V1()
        return info["input"]["required"]["seed"][1]

    assert seed_options("D2F_TrainLoRA").get("control_after_generate") is False
    assert seed_options("D2F_ReflowPairs").get("control_after_generate") is False
    assert seed_options("D2F_DepthEstimate").get("control_after_generate") is False  # a depth map is reproducible
    assert seed_options("D2F_KSampler").get("control_after_generate") is True


# ---------------------------------------------------------------------------------------------
# inputs generated from the option and choice registries


def frontend_inputs(cls: type) -> dict[str, dict]:
    """Every input as the front-end gets it (``/object_info``): name -> options (type under "type")."""
    info = cls.GET_NODE_INFO_V1()["input"]
    return {
        name: {"type": spec[0], "optional": category == "optional", **(spec[1] if len(spec) > 1 else {})}
        for category in ("required", "optional")
        for name, spec in info.get(category, {}).items()
    }


def test_reflow_pairs_inputs_are_the_pairs_config_options(comfy_nodes) -> None:
    """The node's option inputs are PairsConfig's (the CLI's `pairs` flags), with the same defaults,
    ranges, choices and help; only the options a graph gives otherwise (the teacher's LoRA and zero
    terminal SNR with its MODEL, the negative prompt as CONDITIONING) are the CLI's alone."""
    from training.config import PairsConfig, option_specs

    inputs = frontend_inputs(comfy_nodes["D2F_ReflowPairs"])
    specs = {spec.name: spec for spec in option_specs(PairsConfig)}
    assert set(specs) - set(inputs) == {"lora_strength", "zero_terminal_snr"}
    assert inputs["negative"]["type"] == "CONDITIONING"  # the graph's negative prompt, not PairsConfig's string
    for name, spec in specs.items():
        if name in ("lora_strength", "zero_terminal_snr", "negative"):
            continue
        got = inputs[name]
        assert (got["default"], got["tooltip"]) == (spec.default, spec.help), name
        if spec.choices is not None:
            assert (got["type"], got["options"]) == ("COMBO", list(spec.choices)), name
        else:
            assert got["type"] == {int: "INT", float: "FLOAT"}[spec.type], name
            assert (got["min"], got["max"]) == (spec.min, spec.max), name
            assert got.get("step") == (spec.step if spec.step is None or spec.type is float else int(spec.step)), name
    # saved workflows store widget values by position: the widgets of the first release keep their places
    # before folder, every later option comes after it (optional: older API prompts get its default)
    widgets = [name for name, got in inputs.items() if got["type"] not in ("MODEL", "CONDITIONING", "LATENT")]
    first = ["count", "width", "height", "steps", "cfg", "sampler", "seed", "batch_size", "folder"]
    assert widgets[: len(first)] == first
    assert widgets[len(first) :] == [
        n for n in specs if n not in first and n not in ("lora_strength", "negative", "zero_terminal_snr")
    ]
    assert all(inputs[n]["optional"] for n in widgets[len(first) :])


# combos whose options are a registry's names: their tooltips and help pages must describe every entry
def registry_of(options: list) -> str | None:
    from training.registry_text import REGISTRIES, names

    matches = [r for r in REGISTRIES if options and set(options) <= set(names(r))]
    return matches[0] if matches else None


def test_every_registry_choice_is_described_in_its_tooltip_and_help_page(comfy_nodes) -> None:
    from training.registry_text import DOCS, PAGE_BLOCKS

    seen, problems = set(), []
    for node_id, cls in comfy_nodes.items():
        if not node_id.startswith("D2F_"):
            continue
        for name, got in frontend_inputs(cls).items():
            registry = registry_of(got.get("options", []))
            if registry is None:
                continue
            seen.add(registry)
            problems += [f"{node_id}.{name}: tooltip misses {o}" for o in got["options"] if o not in got["tooltip"]]
            if registry not in PAGE_BLOCKS.get(node_id, ()):
                problems.append(f"{node_id}.{name}: no '{registry}' block listed for its help page in PAGE_BLOCKS")
            page = (DOCS / node_id / "en.md").read_text(encoding="utf-8")
            if f"<!-- generated: {registry} -->" not in page:
                problems.append(f"{node_id}.{name}: its help page has no generated '{registry}' block")
    assert problems == []
    assert seen == {
        "samplers",
        "grids",
        "start_rules",
        "objectives",
        "algorithms",
        "optimizers",
        "timestep_samplers",
        "losses",
    }


def test_sampling_node_strings_follow_a_reworded_sampler(comfy_nodes, monkeypatch) -> None:
    """The sampling nodes render their registry text when the schema is built: a reworded or added
    sampler reaches their descriptions and tooltips without editing them."""
    import dataclasses

    import d2f_core

    euler = d2f_core.SAMPLERS["euler"]
    monkeypatch.setitem(d2f_core.SAMPLERS, "euler", dataclasses.replace(euler, description="FM Euler, reworded"))
    monkeypatch.setitem(
        d2f_core.SAMPLERS,
        "midpoint",
        dataclasses.replace(euler, name="midpoint", evaluations_per_step=2, description="FM midpoint, new"),
    )
    for node_id in ("D2F_FMEulerSampler", "D2F_KSampler"):
        schema = comfy_nodes[node_id].define_schema()
        sampler = next(i for i in schema.inputs if i.id == "sampler")
        assert "FM Euler, reworded" in sampler.tooltip and "midpoint: FM midpoint, new" in sampler.tooltip, node_id
        assert "FM Euler, reworded" in schema.description, node_id
    steps = next(i for i in comfy_nodes["D2F_FMScheduler"].define_schema().inputs if i.id == "steps")
    assert "midpoint 2" in steps.tooltip
