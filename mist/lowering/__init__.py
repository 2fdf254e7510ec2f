from .deployment import *  # noqa: F401,F403
