"""GSM8K-100 accuracy gate: lm-eval's ``gsm8k`` task, reproduced offline.

The modules import nothing heavy: prompts (``task``), answer extraction and
scoring (``extract``), statistics (``stats``), answer sources (``clients``)
and the orchestration that ties them to pass/fail rules (``run``).
"""
