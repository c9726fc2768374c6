"""controller: the studio-side service that schedules LLM requests and image jobs on GPU agents."""

__version__ = "0.1.0"
