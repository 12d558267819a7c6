"""Integrations with other evaluation tools (lmms-eval: :mod:`videollm.integrations.lmms_eval`)."""
