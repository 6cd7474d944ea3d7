from ternqc.cli import entry

entry()
