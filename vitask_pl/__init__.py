"""VITask: turn a generalist vision-language model into a task specialist."""

__version__ = "0.1.0"
