"""nanovllm's log lines (backend choice, KV-cache size, graph capture time) go to stderr at
INFO, as vLLM's do. NANOVLLM_LOGGING_LEVEL=WARNING (or any level name) quiets them."""
import logging
import os


def configure_logging() -> None:
    logger = logging.getLogger("nanovllm")
    if logger.handlers:         # configured already (or by the application)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("NANOVLLM_LOGGING_LEVEL", "INFO").upper())
    # Records still propagate (so pytest and applications can capture them); the root logger
    # has no handler unless the application adds one.
