"""Evaluation of trained models: HumanEval pass@k (humaneval.py, execution.py, passk.py)."""
