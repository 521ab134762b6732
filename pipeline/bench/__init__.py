"""The bench: specs.py (the --codec grammar), run.py (measuring), bdrate.py, throughput.py, report.py (outputs)."""
