"""The headless command line (`ptq-studio <command>`): parsers, commands and their PNG charts."""
