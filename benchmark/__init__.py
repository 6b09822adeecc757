"""The harness: suite config -> run units -> executor -> store; the command-line interface."""

__version__ = "0.1.0"
