"""Messages a pack node writes on itself in the page (web/ctrlora.js draws them), beside the server log."""
import logging

from ..training.progress import executing_node, prompt_server

WARNING_EVENT = "ctrlora.node.warning"


def warn_on_node(text):
    """Logs ``text`` and sends it to the page for the node ComfyUI is running now, which shows it on that node
    until the next run."""
    logging.warning(text)
    server = prompt_server()
    prompt_id, node_id = executing_node()
    if server is None or node_id is None:
        return
    try:
        server.send_sync(WARNING_EVENT, {"node": node_id, "prompt_id": prompt_id, "message": text})
    except Exception as e:  # a message to the page must never stop a run
        logging.debug("CtrLoRA: warning not sent to the page: %s", e)
