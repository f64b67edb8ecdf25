"""Every command's parser, and the one place that parses arguments: ``main`` holds the
dispatch table and the entry point (``llamaforge COMMAND``, ``llamaforge.cli.main.main``);
each other module registers one family of commands and calls into the library."""
