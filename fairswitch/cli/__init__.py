"""Command line: ``fairswitch <command>``; one module per command."""
