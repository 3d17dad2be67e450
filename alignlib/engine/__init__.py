"""The CPU decode engine under ``alignlib.generation``: linear layers packed once for oneDNN."""
