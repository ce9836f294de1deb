"""llama.cpp on any CPU: every model this project loads through llama-cpp-python skips ggml's extra buffer types.

Why: llama-cpp-python is compiled on install, for the CPU of the machine that builds it (``-march=native``).
On a CPU that reports AMX (Sapphire Rapids and newer Xeons, common on cloud VMs) ggml then puts the weights in
its AMX buffer type, and its matrix multiply executes AMX tile instructions (``ldtilecfg``). A VM that reports
AMX but does not permit it kills the process with SIGSEGV in ``libggml-cpu.so`` on the first token. ggml's
"extra buffer types" are exactly that AMX path and the weight-repacking path; with them off, weights stay in
the plain CPU buffer and the ordinary (AVX2/AVX-512) kernels run, which work wherever the build runs.

The choice, rather than a build that does not target the build machine (``CMAKE_ARGS=-DGGML_NATIVE=OFF``):
pip caches the wheel it built, so a build flag given once is silently skipped on the next install, while a
load parameter holds for every build, including one a user made themselves. What it costs is measured in
``bench/llamacpp_extra_bufts.py`` and given in docs/teacher.md (about nothing for the bundled Q4_1 model,
which ggml does not repack).

The llama-cpp-python ``Llama`` class has no argument for it and loads the model inside its constructor, so
the one seam is its call of ``llama_model_default_params()``: ``use_portable_defaults()`` wraps that function
once per process so that its result has ``use_extra_bufts = False``. ``GRPO_LLM_EVAL_LLAMA_EXTRA_BUFTS=1``
turns the extra buffer types back on, for a user who knows their CPU runs them.

``python -m grpo_llm_eval.teacher.backends.llamacpp --model X.gguf ...`` is ``python -m llama_cpp.server`` with the
same defaults (every argument is the server's).
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

ENV_EXTRA_BUFTS = "GRPO_LLM_EVAL_LLAMA_EXTRA_BUFTS"
_lock = threading.Lock()
_installed = False


def extra_bufts_wanted() -> bool:
    """Whether the user asked for ggml's extra buffer types back (off by default: see the module docstring)."""
    return os.environ.get(ENV_EXTRA_BUFTS, "").strip().lower() in ("1", "true", "yes", "on")


def use_portable_defaults() -> bool:
    """Make every llama.cpp model loaded by this process skip ggml's extra buffer types (idempotent).

    Returns whether models are now loaded that way. False where the user turned it off, or where the
    installed llama-cpp-python has no such parameter (older than the pinned range; a warning says so).
    """
    global _installed
    import llama_cpp.llama_cpp as lib

    if extra_bufts_wanted():
        return False
    with _lock:
        if _installed:
            return True
        fields = {name for name, *_ in lib.llama_model_params._fields_}
        if "use_extra_bufts" not in fields:
            logger.warning("This llama-cpp-python has no use_extra_bufts model parameter; ggml may use AMX or "
                           "repacked weights on this CPU. Install the pinned version: pip install -e .")
            return False
        original = lib.llama_model_default_params

        def portable_model_default_params():
            params = original()
            params.use_extra_bufts = False
            return params

        portable_model_default_params.__wrapped__ = original
        lib.llama_model_default_params = portable_model_default_params
        _installed = True
        return True


def load_llama(model_path: str, **kwargs):
    """``llama_cpp.Llama(model_path, **kwargs)`` with the portable defaults; the model's params are checkable
    afterwards as ``llm.model_params.use_extra_bufts``."""
    use_portable_defaults()
    from llama_cpp import Llama

    return Llama(model_path=model_path, **kwargs)


def serve() -> None:
    """llama-cpp-python's OpenAI-compatible server, loading its models with the portable defaults."""
    import faulthandler

    faulthandler.enable()
    portable = use_portable_defaults()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.info("llama.cpp server, use_extra_bufts=%s", not portable)
    from llama_cpp.server.__main__ import main

    main()


if __name__ == "__main__":
    serve()
