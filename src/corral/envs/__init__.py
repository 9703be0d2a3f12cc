"""Trainer-facing environments over corral's episodes."""

from corral.envs.gym_env import SandboxEnv, register

register()

__all__ = ["SandboxEnv", "register"]
