"""Evaluation tasks: procedurally generated data with exact answers (numpy + Pillow only)."""
