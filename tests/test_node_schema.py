"""What every pack node tells the user in the page, on whichever host runs the tests (COMFYUI_PATH): the node ids and
display names saved workflows use, and a tooltip on every input and output."""
from conftest import pack
from ui_host import load_workflows

# Node id -> display name. Saved workflows name nodes by id; changing either breaks users' files or their searches.
NODES = {
    "CtrLoRALoadBase": "Load Base ControlNet", "CtrLoRALoad": "Load CtrLoRA",
    "CtrLoRAVAEConditionEncode": "VAE Condition Encode", "CtrLoRAApply": "Apply CtrLoRA",
    "CtrLoRATrain": "Train CtrLoRA", "CtrLoRALoadConditionImage": "Load Condition Image (as trained)",
}


def test_node_ids_and_display_names_stay_as_saved_workflows_know_them():
    assert {k: v for k, v in pack.NODE_DISPLAY_NAME_MAPPINGS.items() if k in NODES} == NODES
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    used = {node["type"] for workflow in load_workflows().values() for node in workflow["nodes"]
            if node["type"].startswith("CtrLoRA")}
    assert used <= set(pack.NODE_CLASS_MAPPINGS)


def test_every_input_and_output_has_a_tooltip():
    missing = []
    for name, node in pack.NODE_CLASS_MAPPINGS.items():
        for section, inputs in node.INPUT_TYPES().items():
            if section == "hidden":
                continue
            missing += [f"{name} input {key}" for key, spec in inputs.items()
                        if not (len(spec) > 1 and spec[1].get("tooltip"))]
        outputs, tooltips = getattr(node, "RETURN_NAMES", node.RETURN_TYPES), getattr(node, "OUTPUT_TOOLTIPS", ())
        if len(tooltips) != len(outputs) or not all(tooltips):
            missing.append(f"{name} outputs {outputs}: tooltips {tooltips}")
    assert missing == []
