"""Measuring what each unit of a model costs inside limited containers."""
