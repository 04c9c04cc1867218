"""Downstream evaluation: an lm-eval model over our GPT (lm.py), local tasks (tasks/), the loop's hook (downstream.py)."""
