"""`tollgate demo`: a sandbox, real servers, the agent, a subject's traffic."""

from agent.demo.run import run_demo

__all__ = ["run_demo"]
