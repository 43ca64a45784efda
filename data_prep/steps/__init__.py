"""One module per ``python -m data_prep`` step: its settings, the work of one case and the whole run."""
