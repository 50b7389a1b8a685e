"""What `main.py --mode=<mode>` runs: `run(mode, config, workdir)`, dispatched through `MODES`.

A mode is one function `fn(config, workdir) -> dict` (the JSON summary main.py prints) in
its own file under `retrieval_jax/modes/`, registered here under its name; adding a mode is
adding one entry (see `modes/__init__.py` for what each does).
"""
from typing import Any, Callable, Dict

from retrieval_jax import config_checks
from retrieval_jax import registry
from retrieval_jax.aot import mode as compile_mode
from retrieval_jax.modes import describe as describe_mode
from retrieval_jax.modes import detect as detect_mode
from retrieval_jax.modes import evaluate as evaluate_mode
from retrieval_jax.modes import export as export_mode
from retrieval_jax.modes import extract as extract_mode
from retrieval_jax.modes import search as search_mode
from retrieval_jax.modes import train as train_mode
from retrieval_jax.search_page import app as search_page_app

Summary = Dict[str, Any]
MODES: registry.Registry[Callable[[Any, str], Summary]] = registry.Registry("mode")
MODES.register("train", train_mode.train)
MODES.register("evaluate", evaluate_mode.evaluate)
MODES.register("extract", extract_mode.extract)
MODES.register("export", export_mode.export)
MODES.register("describe", describe_mode.describe)
MODES.register("search", search_mode.search)
MODES.register("detect", detect_mode.detect)  # Detect-to-Retrieve: a detector's boxes
MODES.register("serve", search_page_app.serve_mode)  # a search page over a described folder
MODES.register("compile", compile_mode.run)  # pod rehearsal: AOT for a TPU topology


def run(mode: str, config, workdir: str) -> Summary:
  """Runs `mode` (a name in `MODES`) on `config` in `workdir`; returns its summary.

  The config's values are checked first (`config_checks.validate`), before any compute.
  """
  if mode not in MODES:
    raise config_checks.ConfigError(f"--mode={mode!r} is not one of {MODES.names()}")
  config_checks.validate(config, mode)
  return MODES.get(mode)(config, workdir)
