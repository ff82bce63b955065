"""Reports: plots and a self-contained HTML report."""
