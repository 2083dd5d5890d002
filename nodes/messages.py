"""Messages a pack node writes on itself in the page (web/ctrlora.js draws them), beside the server log."""
import logging
import sys

WARNING_EVENT = "ctrlora.node.warning"


def warn_on_node(text):
    """Logs ``text`` and sends it to the page for the node ComfyUI is running now, which shows it on that node
    until the next run."""
    logging.warning(text)
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    try:
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
    except ImportError:
        context = None
    if server is None or context is None:
        return
    try:
        server.send_sync(WARNING_EVENT, {"node": context.node_id, "prompt_id": context.prompt_id, "message": text})
    except Exception as e:  # a message to the page must never stop a run
        logging.debug("CtrLoRA: warning not sent to the page: %s", e)
