"""ojs-trio: an Open Job Spec job server and embeddable job engine on Trio."""

from ojs_trio.engine.engine import Engine, EngineConfig, open_engine
from ojs_trio.engine.errors import OjsError
from ojs_trio.engine.job import Job
from ojs_trio.engine.states import JobState

__all__ = ["Engine", "EngineConfig", "Job", "JobState", "OjsError", "open_engine"]
__version__ = "0.1.0"
