"""Batch chat completions against OpenAI-compatible endpoints, with an exact, resumable record.

The command line (``pipeline``) is the main interface; the stages live in their own
modules: :mod:`pipeline.spec`, :mod:`pipeline.inputs`, :mod:`pipeline.limits`,
:mod:`pipeline.policy`, :mod:`pipeline.client`, :mod:`pipeline.worker`,
:mod:`pipeline.recorder`, :mod:`pipeline.store`, :mod:`pipeline.outputs`,
:mod:`pipeline.pricing`, :mod:`pipeline.reports`, :mod:`pipeline.run`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
